//! The edge's public API against fake cells on loopback.

mod common;

use cellvm_token::{Scope, Verifier};
use cellvm_wire::api::{Sandbox, SandboxStatus};
use common::{error_body, pattern, pattern_stream, CellKind, Cloud};
use futures::StreamExt as _;
use reqwest::Method;
use serde_json::json;

use CellKind::{Fake, Refusing};

#[tokio::test]
async fn health_and_key_set_need_no_key() {
    let cloud = Cloud::start(&[Fake]).await;
    let health = cloud.http.get(format!("{}/healthz", cloud.url));
    assert_eq!(health.send().await.expect("send").status(), 200);
    let jwks = cloud.http.get(format!("{}/.well-known/jwks.json", cloud.url));
    let jwks: cellvm_token::Jwks =
        jwks.send().await.expect("send").json().await.expect("json");
    assert_eq!(jwks, cloud.edge.jwks());
}

#[tokio::test]
async fn missing_wrong_and_revoked_keys_are_401_json() {
    let cloud = Cloud::start(&[Fake]).await;
    let url = format!("{}/api/sandboxes", cloud.url);
    let resp = cloud.http.get(&url).send().await.expect("send");
    assert_eq!(error_body(resp).await.2, "unauthorized");

    let wrong = format!("cvm_{}", "ab".repeat(32));
    for key in [wrong.as_str(), "nonsense", ""] {
        let resp = cloud.req_as(key, Method::GET, "/api/sandboxes");
        let (status, _, code) =
            error_body(resp.send().await.expect("send")).await;
        assert_eq!((status, code.as_str()), (401, "unauthorized"), "{key}");
    }

    let store = cloud.edge.store();
    let id = store.authenticate(&cloud.key).expect("db").expect("ok").key_id;
    store.revoke_api_key(&id).expect("revoke");
    let resp = cloud.req(Method::POST, "/api/sandboxes").json(&json!({}));
    assert_eq!(resp.send().await.expect("send").status(), 401);
}

#[tokio::test]
async fn bad_body_is_400_naming_the_field() {
    let cloud = Cloud::start(&[Fake]).await;
    for (body, field) in [
        (r#"{"cpuCount":"two"}"#, "cpuCount"),
        (r#"{"memoryMB":64}"#, "memoryMB"),
        (r#"{"timeout":99999999}"#, "timeout"),
        (r#"{"cpuCount":1,"gpu":true}"#, "gpu"),
    ] {
        let resp = cloud
            .req(Method::POST, "/api/sandboxes")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("send");
        let (status, error, code) = error_body(resp).await;
        assert_eq!((status, code.as_str()), (400, "bad_request"), "{body}");
        assert!(error.contains(field), "{body}: {error}");
    }
    assert_eq!(cloud.cell("cell-0").state.creates.load(Ordering::SeqCst), 0);
}

use std::sync::atomic::Ordering;

#[tokio::test]
async fn create_get_list_delete_round_trip() {
    let cloud = Cloud::start(&[Fake]).await;
    let created = cloud
        .create(json!({"templateID":"base","cpuCount":2,"metadata":{"k":"v"}}))
        .await;
    let id = created.sandbox_id.clone();
    assert!(id.starts_with("sb-") && id.len() == 19, "{id}");
    assert!(id[3..]
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(created.status, SandboxStatus::Running);
    assert_eq!(created.cell_id, "cell-0");
    assert_eq!(created.region, "region-0");
    assert_eq!(created.connect_url, cloud.cell("cell-0").url);
    assert_eq!(created.cpu_count, 2);
    assert_eq!(created.memory_mb, 512, "edge default reaches the cell");

    // The token lets the client talk to that cell, and only that one.
    let v = Verifier::new(&cloud.edge.jwks()).expect("verifier");
    let now = cellvm_token::now_s();
    let claims = v.verify(&created.token, "cell-0", now).expect("valid");
    assert_eq!(
        (claims.sub.as_str(), claims.scope),
        (id.as_str(), Scope::Sandbox)
    );
    assert!(v.verify(&created.token, "cell-1", now).is_err());
    let create_claims =
        cloud.cell("cell-0").state.last_claims.lock().expect("lock").clone();
    assert_eq!(create_claims.expect("claims").scope, Scope::Create);

    let got: Sandbox = cloud
        .req(Method::GET, &format!("/api/sandboxes/{id}"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(got.worker_id, "worker-1");
    assert_eq!(got.connect_url, created.connect_url);
    assert!(!got.token.is_empty());

    let second = cloud.create(json!({})).await;
    let list: Vec<Sandbox> = cloud
        .req(Method::GET, "/api/sandboxes")
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = list.iter().map(|s| s.sandbox_id.as_str()).collect();
    assert_eq!(ids, [second.sandbox_id.as_str(), id.as_str()]);
    assert!(list.iter().all(|s| !s.token.is_empty()));
    assert_eq!(list[1].metadata["k"], "v");

    let path = format!("/api/sandboxes/{id}");
    let resp = cloud.req(Method::DELETE, &path).send().await.expect("send");
    assert_eq!(resp.status(), 204);
    assert!(!cloud.cell("cell-0").has(&id));
    let resp = cloud.req(Method::GET, &path).send().await.expect("send");
    assert_eq!(error_body(resp).await.0, 404);
    let resp = cloud.req(Method::DELETE, &path).send().await.expect("send");
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn create_goes_to_the_second_cell_when_the_first_refuses_connections() {
    let cloud = Cloud::start(&[Refusing, Fake]).await;
    let sb = cloud.create(json!({})).await;
    assert_eq!(sb.cell_id, "cell-1");
    assert_eq!(sb.connect_url, cloud.cell("cell-1").url);
    assert!(cloud.cell("cell-1").has(&sb.sandbox_id));
}

#[tokio::test]
async fn create_skips_a_full_cell() {
    let cloud = Cloud::start(&[Fake, Fake]).await;
    cloud.cell("cell-0").state.full.store(true, Ordering::SeqCst);
    let sb = cloud.create(json!({})).await;
    assert_eq!(sb.cell_id, "cell-1");
}

#[tokio::test]
async fn no_cell_accepting_is_503_with_retry_after_and_no_row() {
    let cloud = Cloud::start(&[Refusing, Fake]).await;
    cloud.cell("cell-1").state.full.store(true, Ordering::SeqCst);
    let resp = cloud
        .req(Method::POST, "/api/sandboxes")
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert!(resp.headers().contains_key("retry-after"));
    let (status, _, code) = error_body(resp).await;
    assert_eq!((status, code.as_str()), (503, "no_capacity"));
    let org = cloud
        .edge
        .store()
        .authenticate(&cloud.key)
        .expect("db")
        .expect("ok")
        .org;
    assert!(cloud
        .edge
        .store()
        .list_sandboxes(&org.id)
        .expect("list")
        .is_empty());
}

#[tokio::test]
async fn cell_404_for_unknown_template_is_passed_through_without_row() {
    let cloud = Cloud::start(&[Fake, Fake]).await;
    let resp = cloud
        .req(Method::POST, "/api/sandboxes")
        .json(&json!({"templateID": common::MISSING_TEMPLATE}))
        .send()
        .await
        .expect("send");
    let (status, _, code) = error_body(resp).await;
    assert_eq!((status, code.as_str()), (404, "template_not_found"));
    let list: Vec<Sandbox> = cloud
        .req(Method::GET, "/api/sandboxes")
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert!(list.is_empty());
    // A client error is final: the second cell was never asked.
    assert_eq!(cloud.cell("cell-1").state.creates.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn another_orgs_sandbox_is_404_everywhere() {
    let cloud = Cloud::start(&[Fake]).await;
    let sb = cloud.create(json!({})).await;
    let store = cloud.edge.store();
    let other =
        store.create_org("other", cellvm_edge::Plan::Free, 5).expect("org");
    let theirs = store.create_api_key(&other.id, "t").expect("key").key;
    let id = &sb.sandbox_id;
    for (method, path) in [
        (Method::GET, format!("/api/sandboxes/{id}")),
        (Method::DELETE, format!("/api/sandboxes/{id}")),
        (Method::POST, format!("/api/sandboxes/{id}/echo")),
        (Method::GET, "/api/sandboxes/sb-0000000000000000/echo".into()),
    ] {
        let resp = cloud.req_as(&theirs, method.clone(), &path).send().await;
        let (status, _, code) = error_body(resp.expect("send")).await;
        assert_eq!(
            (status, code.as_str()),
            (404, "not_found"),
            "{method} {path}"
        );
    }
    assert!(cloud.cell("cell-0").has(id), "still there for its owner");
}

#[tokio::test]
async fn org_over_its_concurrent_limit_gets_429() {
    let cloud = Cloud::start(&[Fake]).await;
    let store = cloud.edge.store();
    let org =
        store.create_org("small", cellvm_edge::Plan::Free, 1).expect("org");
    let key = store.create_api_key(&org.id, "k").expect("key").key;
    let post =
        || cloud.req_as(&key, Method::POST, "/api/sandboxes").json(&json!({}));
    assert_eq!(post().send().await.expect("send").status(), 201);
    let (status, _, code) =
        error_body(post().send().await.expect("send")).await;
    assert_eq!((status, code.as_str()), (429, "concurrency_limit"));
}

#[tokio::test]
async fn proxy_streams_multi_megabyte_bodies_both_ways() {
    const SIZE: u64 = 12 << 20;
    let cloud = Cloud::start(&[Fake]).await;
    let id = cloud.create(json!({})).await.sandbox_id;

    // Upload streamed through the edge and echoed back, also streamed.
    let resp = cloud
        .req(
            Method::PUT,
            &format!("/api/sandboxes/{id}/echo?path=/a%20b&api_key=x&n=1"),
        )
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(pattern_stream(SIZE)))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    let seen =
        cloud.cell("cell-0").state.echo_seen.lock().expect("lock").clone();
    // The key never reaches a cell; the rest of the query arrives raw.
    assert_eq!(seen, [("path=/a%20b&n=1".to_owned(), false)]);
    assert_eq!(h["retry-after"], "7");
    assert_eq!(h["content-type"], "application/octet-stream");
    let mut seen = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        for b in chunk.expect("chunk") {
            assert_eq!(b, pattern(seen), "byte {seen}");
            seen += 1;
        }
    }
    assert_eq!(seen, SIZE);

    // Download generated by the cell.
    let resp = cloud
        .req(Method::GET, &format!("/api/sandboxes/{id}/blob?size={SIZE}"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.expect("body");
    assert_eq!(bytes.len() as u64, SIZE);
    assert!(bytes.iter().enumerate().all(|(i, b)| *b == pattern(i as u64)));
}

#[tokio::test]
async fn proxy_to_an_unreachable_cell_is_502() {
    let cloud = Cloud::start(&[Fake, Refusing]).await;
    // Index a sandbox on the refusing cell, as if it had gone down since.
    let store = cloud.edge.store();
    let org = store.authenticate(&cloud.key).expect("db").expect("ok").org;
    let new = cellvm_edge::store::NewSandbox {
        id: "sb-00000000000000aa".into(),
        org_id: org.id,
        template: "base".into(),
        cpu_count: 1,
        memory_mb: 512,
        disk_mb: 2048,
        timeout_s: 300,
        metadata: Default::default(),
    };
    store.insert_pending(&new, 1).expect("insert");
    store.set_attempt(&new.id, "cell-1").expect("cell");
    store.set_status(&new.id, SandboxStatus::Running).expect("status");
    let resp = cloud
        .req(Method::GET, &format!("/api/sandboxes/{}/files?path=/x", new.id))
        .send()
        .await
        .expect("send");
    let (status, _, code) = error_body(resp).await;
    assert_eq!((status, code.as_str()), (502, "cell_unreachable"));
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let cloud = Cloud::start(&[Fake]).await;
    let resp = cloud.req(Method::GET, "/api/nope").send().await.expect("send");
    assert_eq!(error_body(resp).await.2, "not_found");
    let resp =
        cloud.req(Method::PATCH, "/api/sandboxes").send().await.expect("send");
    let (status, _, code) = error_body(resp).await;
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"));
}

/// Regression (issue 3): requests refused before any handler ran (by
/// axum's extractors, or for their length) answered plain text, not
/// the documented `{"error", "code"}`.
#[tokio::test]
async fn refusals_before_any_handler_answer_json() {
    let cloud = Cloud::start(&[Fake]).await;
    let id = cloud.create(json!({})).await.sandbox_id;
    let long = "a".repeat(cellvm_wire::api::limits::MAX_URI_BYTES);
    let cases: Vec<(Method, String, u16, &str)> = vec![
        // A path segment that is not UTF-8 once percent-decoded.
        (Method::GET, "/api/sandboxes/%FF".into(), 400, "bad_request"),
        (Method::DELETE, "/api/sandboxes/%C3%28".into(), 400, "bad_request"),
        (
            Method::GET,
            format!("/api/sandboxes/{id}/fi%FFles"),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/internal/admin/orgs/%FF/credits".into(),
            400,
            "bad_request",
        ),
        // A malformed escape is kept literally: an unknown sandbox.
        (Method::GET, "/api/sandboxes/%ZZ".into(), 404, "not_found"),
        (
            Method::PATCH,
            format!("/api/sandboxes/{id}"),
            405,
            "method_not_allowed",
        ),
        (Method::PUT, "/api/usage".into(), 405, "method_not_allowed"),
        (Method::GET, format!("/api/sandboxes?x={long}"), 414, "uri_too_long"),
        (
            Method::GET,
            format!("/api/sandboxes/{id}/files?path=/{long}"),
            414,
            "uri_too_long",
        ),
    ];
    for (method, path, want, code) in cases {
        let resp =
            cloud.req(method.clone(), &path).send().await.expect("send");
        let (status, error, got) = error_body(resp).await;
        assert_eq!((status, got.as_str()), (want, code), "{method} {path}");
        assert!(!error.is_empty(), "{method} {path}");
    }
    // A body over the route's limit (axum's 2 MiB default here).
    let resp = cloud
        .req(Method::POST, "/internal/events")
        .body(vec![b'x'; 3 << 20])
        .send()
        .await
        .expect("send");
    let (status, _, code) = error_body(resp).await;
    assert_eq!((status, code.as_str()), (413, "payload_too_large"));
}

/// `?path=` is passed on to the cell exactly as the client encoded it,
/// so the worker can refuse bytes that are not UTF-8 instead of
/// receiving U+FFFD.
#[tokio::test]
async fn file_path_query_reaches_the_cell_as_encoded() {
    let cloud = Cloud::start(&[Fake]).await;
    let id = cloud.create(json!({})).await.sandbox_id;
    let resp = cloud
        .req(Method::GET, &format!("/api/sandboxes/{id}/echo?path=/t/%FF%2B+"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let seen = cloud.cell("cell-0").state.echo_seen.lock().expect("lock");
    assert_eq!(seen[0].0, "path=/t/%FF%2B+");
}
