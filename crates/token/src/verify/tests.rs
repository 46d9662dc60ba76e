//! Every way a token is refused, and the one way it is accepted.

use super::*;
use crate::claims::Scope;
use crate::key::SigningKey;

const NOW: u64 = 1_700_000_000;

fn edge_key() -> SigningKey {
    SigningKey::from_seed([42; 32])
}

fn claims(aud: &str) -> Claims {
    Claims::new(Scope::Sandbox, aud, "sb-0123456789abcdef", "org-1", NOW, 600)
}

fn verifier() -> Verifier {
    Verifier::new(&edge_key().jwks()).expect("valid key set")
}

fn b64(json: &str) -> String {
    segment::encode(json.as_bytes())
}

#[test]
fn a_valid_token_round_trips() {
    let token = edge_key().sign(&claims("cell-a"));
    let got = verifier().verify(&token, "cell-a", NOW + 10);
    assert_eq!(got, Ok(claims("cell-a")));
}

#[test]
fn jwks_json_round_trips_into_a_working_verifier() {
    let json = edge_key().jwks().to_json();
    let jwks = Jwks::from_json(&json).expect("parse");
    let v = Verifier::new(&jwks).expect("verifier");
    let token = edge_key().sign(&claims("cell-a"));
    assert!(v.verify(&token, "cell-a", NOW).is_ok());
}

#[test]
fn token_for_cell_a_is_refused_by_cell_b() {
    let token = edge_key().sign(&claims("cell-a"));
    let err = verifier().verify(&token, "cell-b", NOW).expect_err("aud");
    assert_eq!(
        err,
        TokenError::WrongAudience {
            expected: "cell-b".into(),
            actual: "cell-a".into()
        }
    );
}

#[test]
fn tampered_payload_fails_the_signature() {
    let token = edge_key().sign(&claims("cell-a"));
    let parts: Vec<&str> = token.split('.').collect();
    let mut forged = claims("cell-a");
    forged.sub = "sb-ffffffffffffffff".into();
    let body = segment::encode_json(&forged);
    let tampered = format!("{}.{}.{}", parts[0], body, parts[2]);
    let err = verifier().verify(&tampered, "cell-a", NOW).expect_err("sig");
    assert_eq!(err, TokenError::BadSignature);
}

#[test]
fn another_key_with_the_same_kid_fails_the_signature() {
    let impostor = SigningKey::from_seed_with_kid([9; 32], edge_key().kid());
    let token = impostor.sign(&claims("cell-a"));
    let err = verifier().verify(&token, "cell-a", NOW).expect_err("sig");
    assert_eq!(err, TokenError::BadSignature);
}

#[test]
fn unknown_kid_is_named() {
    let other = SigningKey::from_seed([9; 32]);
    let token = other.sign(&claims("cell-a"));
    let err = verifier().verify(&token, "cell-a", NOW).expect_err("kid");
    assert_eq!(err, TokenError::UnknownKid(other.kid().to_owned()));
}

#[test]
fn expired_beyond_leeway_is_refused_within_leeway_accepted() {
    let token = edge_key().sign(&claims("cell-a"));
    let exp = NOW + 600;
    let v = verifier();
    assert!(v.verify(&token, "cell-a", exp + LEEWAY_S).is_ok());
    let now = exp + LEEWAY_S + 1;
    let err = v.verify(&token, "cell-a", now).expect_err("expired");
    assert_eq!(err, TokenError::Expired { exp, now });
}

#[test]
fn issued_in_the_future_is_refused() {
    let token = edge_key().sign(&claims("cell-a"));
    let now = NOW - LEEWAY_S - 1;
    let err = verifier().verify(&token, "cell-a", now).expect_err("iat");
    assert_eq!(err, TokenError::NotYetValid { iat: NOW, now });
}

#[test]
fn alg_none_is_refused_before_any_key_lookup() {
    let head = b64(r#"{"alg":"none","typ":"JWT"}"#);
    let body = segment::encode_json(&claims("cell-a"));
    for token in [format!("{head}.{body}."), format!("{head}.{body}")] {
        let err = verifier().verify(&token, "cell-a", NOW).expect_err("none");
        assert!(
            matches!(
                err,
                TokenError::UnsupportedAlg(_) | TokenError::Malformed(_)
            ),
            "{token}: {err:?}"
        );
    }
    let token = format!("{head}.{body}.");
    let err = verifier().verify(&token, "cell-a", NOW).expect_err("none");
    assert_eq!(err, TokenError::UnsupportedAlg("none".into()));
}

#[test]
fn hs256_header_with_our_kid_is_refused() {
    let kid = edge_key().kid().to_owned();
    let head = b64(&format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#));
    let body = segment::encode_json(&claims("cell-a"));
    let token = format!("{head}.{body}.AAAA");
    let err = verifier().verify(&token, "cell-a", NOW).expect_err("alg");
    assert_eq!(err, TokenError::UnsupportedAlg("HS256".into()));
}

#[test]
fn garbage_is_malformed() {
    let v = verifier();
    let long = "a".repeat(MAX_TOKEN_LEN + 1);
    for token in ["", "garbage", "a.b", "a.b.c.d", "!!.??.**", &long] {
        let err = v.verify(token, "cell-a", NOW).expect_err("garbage");
        assert!(matches!(err, TokenError::Malformed(_)), "{token}: {err:?}");
    }
}

#[test]
fn missing_kid_is_malformed() {
    let head = b64(r#"{"alg":"EdDSA"}"#);
    let body = segment::encode_json(&claims("cell-a"));
    let token = format!("{head}.{body}.AAAA");
    let err = verifier().verify(&token, "cell-a", NOW).expect_err("kid");
    assert_eq!(err, TokenError::Malformed("no kid"));
}

#[test]
fn truncated_signature_is_malformed() {
    let token = edge_key().sign(&claims("cell-a"));
    let cut = &token[..token.len() - 4];
    let err = verifier().verify(cut, "cell-a", NOW).expect_err("sig");
    assert!(matches!(err, TokenError::Malformed(_)), "{err:?}");
}

#[test]
fn foreign_issuer_is_refused_even_when_signed() {
    let mut c = claims("cell-a");
    c.iss = "someone-else".into();
    let token = edge_key().sign(&c);
    let err = verifier().verify(&token, "cell-a", NOW).expect_err("iss");
    assert_eq!(err, TokenError::WrongIssuer("someone-else".into()));
}

#[test]
fn key_set_with_a_non_ed25519_entry_is_refused() {
    let mut jwks = edge_key().jwks();
    jwks.keys[0].crv = "X25519".into();
    assert!(Verifier::new(&jwks).is_err());
    let mut jwks = edge_key().jwks();
    jwks.keys[0].x = "short".into();
    assert!(Verifier::new(&jwks).is_err());
}

#[test]
fn scopes_serialize_lowercase() {
    let token = edge_key().sign(&Claims::new(
        Scope::Create,
        "cell-a",
        "sb-1",
        "org-1",
        NOW,
        60,
    ));
    let body = token.split('.').nth(1).expect("payload");
    let json =
        String::from_utf8(segment::decode(body).expect("b64")).expect("utf8");
    assert!(json.contains(r#""scope":"create""#), "{json}");
    assert!(json.contains(r#""iss":"cellvm-edge""#), "{json}");
}
