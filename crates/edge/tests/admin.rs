//! The operator API (`/internal/admin/...`) against a real edge on
//! loopback, on SQLite and on Postgres: orgs, their keys, plans on
//! create tokens, and the one admin token in front of it all.

mod common;

use cellvm_edge::store::testing::TestPostgres;
use common::{error_body, CellKind, Cloud};
use reqwest::Method;
use serde_json::{json, Value};

const TOKEN: &str = "admin-token-0123456789";

/// Which database the edge of a test keeps its data in.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Declares each test body `$name(Backend)` as `sqlite::$name` and
/// `postgres::$name` (skipped when no Postgres server is reachable and
/// none is required).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::Sqlite).await;
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $name() {
                if super::TestPostgres::create().is_some() {
                    super::$name(super::Backend::Postgres).await;
                }
            })*
        }
    };
}

on_both_backends!(
    orgs_are_created_listed_and_changed,
    bad_input_is_400_naming_the_field_and_changes_nothing,
    no_or_wrong_token_is_401_and_changes_nothing,
    keys_are_created_listed_and_revoked,
    create_tokens_carry_the_orgs_plan,
    credit_changes_that_would_overflow_are_refused,
);

/// A cloud with one fake cell and the admin token, on `backend`; the
/// Postgres database lives as long as the second value.
async fn cloud(backend: Backend) -> (Cloud, Option<TestPostgres>) {
    let pg = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => {
            Some(TestPostgres::create().expect("postgres reachable"))
        }
    };
    let url = pg.as_ref().map(TestPostgres::url);
    let cloud = Cloud::start_with(&[CellKind::Fake], &[], |c| {
        c.admin.token = Some(TOKEN.into());
        c.database = url;
    })
    .await;
    (cloud, pg)
}

/// An operator call with `token` (none: no `Authorization` header).
async fn call_with(
    cloud: &Cloud,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> reqwest::Response {
    let mut req = cloud.http.request(method, format!("{}{path}", cloud.url));
    if let Some(t) = token {
        req = req.header("authorization", t);
    }
    if let Some(b) = body {
        req =
            req.header("content-type", "application/json").body(b.to_owned());
    }
    req.send().await.expect("send")
}

/// An operator call with the right token; expects `want`, returns the
/// JSON body (`null` when there is none).
async fn call(
    cloud: &Cloud,
    method: Method,
    path: &str,
    body: Option<Value>,
    want: u16,
) -> Value {
    let text = body.map(|b| b.to_string());
    let bearer = format!("Bearer {TOKEN}");
    let resp =
        call_with(cloud, Some(&bearer), method.clone(), path, text.as_deref())
            .await;
    let status = resp.status().as_u16();
    let got = resp.text().await.expect("body");
    assert_eq!(status, want, "{method} {path}: {got}");
    serde_json::from_str(&got).unwrap_or(Value::Null)
}

async fn new_org(cloud: &Cloud, name: &str, plan: &str, limit: u32) -> String {
    let body = json!({"name": name, "plan": plan, "concurrentLimit": limit});
    let org =
        call(cloud, Method::POST, "/internal/admin/orgs", Some(body), 201)
            .await;
    org["id"].as_str().expect("id").to_owned()
}

async fn new_key(cloud: &Cloud, org: &str) -> (String, String) {
    let path = format!("/internal/admin/orgs/{org}/keys");
    let key =
        call(cloud, Method::POST, &path, Some(json!({"name": "ci"})), 201)
            .await;
    let id = key["id"].as_str().expect("id").to_owned();
    (id, key["key"].as_str().expect("key").to_owned())
}

async fn orgs(cloud: &Cloud) -> Value {
    call(cloud, Method::GET, "/internal/admin/orgs", None, 200).await
}

async fn orgs_are_created_listed_and_changed(backend: Backend) {
    let (cloud, _pg) = cloud(backend).await;
    let body = json!({"name": "Acme", "plan": "paid", "concurrentLimit": 3,
        "credits": 5000});
    let org =
        call(&cloud, Method::POST, "/internal/admin/orgs", Some(body), 201)
            .await;
    let id = org["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("org-"), "{org}");
    assert_eq!(
        org,
        json!({"id": id, "name": "Acme", "plan": "paid",
            "concurrentLimit": 3, "creditsMicros": 5000})
    );
    let unmetered = new_org(&cloud, "Free Co", "free", 1).await;
    let list = orgs(&cloud).await;
    let by_id = |id: &str| {
        list.as_array()
            .expect("list")
            .iter()
            .find(|o| o["id"] == id)
            .cloned()
            .expect("listed")
    };
    assert_eq!(by_id(&id), org);
    assert_eq!(by_id(&unmetered)["creditsMicros"], Value::Null);
    assert_eq!(by_id("org-default")["plan"], "paid", "bootstrap org");

    let path = format!("/internal/admin/orgs/{id}");
    let changed =
        call(&cloud, Method::PATCH, &path, Some(json!({"plan": "free"})), 200)
            .await;
    assert_eq!(
        (&changed["plan"], &changed["concurrentLimit"]),
        (&json!("free"), &json!(3))
    );
    let body = json!({"concurrentLimit": 1});
    let changed = call(&cloud, Method::PATCH, &path, Some(body), 200).await;
    assert_eq!(changed["plan"], "free", "left as it was");
    assert_eq!(changed["concurrentLimit"], 1);
    assert_eq!(changed["creditsMicros"], 5000);

    // The new limit is the one creates meet.
    let (_, key) = new_key(&cloud, &id).await;
    let post =
        || cloud.req_as(&key, Method::POST, "/api/sandboxes").json(&json!({}));
    assert_eq!(post().send().await.expect("send").status(), 201);
    let (status, _, code) =
        error_body(post().send().await.expect("send")).await;
    assert_eq!((status, code.as_str()), (429, "concurrency_limit"));

    let gone = "/internal/admin/orgs/org-0000000000000000";
    let bearer = format!("Bearer {TOKEN}");
    let resp = call_with(
        &cloud,
        Some(&bearer),
        Method::PATCH,
        gone,
        Some(r#"{"plan":"paid"}"#),
    )
    .await;
    let (status, error, code) = error_body(resp).await;
    assert_eq!((status, code.as_str()), (404, "not_found"));
    assert!(error.contains("org-0000000000000000"), "{error}");
}

async fn bad_input_is_400_naming_the_field_and_changes_nothing(
    backend: Backend,
) {
    let (cloud, _pg) = cloud(backend).await;
    let org = new_org(&cloud, "acme", "free", 2).await;
    let before = orgs(&cloud).await;
    let long = "n".repeat(65);
    let create = "/internal/admin/orgs".to_owned();
    let patch = format!("/internal/admin/orgs/{org}");
    let keys = format!("/internal/admin/orgs/{org}/keys");
    let cases: Vec<(Method, &str, String, &str)> = vec![
        (
            Method::POST,
            &create,
            r#"{"name":"a","plan":"dev","concurrentLimit":1}"#.into(),
            "plan",
        ),
        (
            Method::POST,
            &create,
            r#"{"name":"a","plan":"pro","concurrentLimit":1}"#.into(),
            "plan",
        ),
        (
            Method::POST,
            &create,
            r#"{"name":"a","concurrentLimit":1}"#.into(),
            "plan",
        ),
        (
            Method::POST,
            &create,
            r#"{"name":"a","plan":"free","concurrentLimit":0}"#.into(),
            "concurrentLimit",
        ),
        (
            Method::POST,
            &create,
            r#"{"name":"a","plan":"free","concurrentLimit":10001}"#.into(),
            "concurrentLimit",
        ),
        (
            Method::POST,
            &create,
            r#"{"name":"a","plan":"free","concurrentLimit":"1"}"#.into(),
            "concurrentLimit",
        ),
        (
            Method::POST,
            &create,
            r#"{"name":"","plan":"free","concurrentLimit":1}"#.into(),
            "name",
        ),
        (
            Method::POST,
            &create,
            format!(
                r#"{{"name":"{long}","plan":"free","concurrentLimit":1}}"#
            ),
            "name",
        ),
        (
            Method::POST,
            &create,
            r#"{"name":"a\u0000","plan":"free","concurrentLimit":1}"#.into(),
            "name",
        ),
        (
            Method::POST,
            &create,
            r#"{"name":"a","plan":"free","concurrentLimit":1,"credits":-5}"#
                .into(),
            "creditsMicros",
        ),
        (
            Method::POST,
            &create,
            r#"{"name":"a","plan":"free","concurrentLimit":1,"owner":"x"}"#
                .into(),
            "owner",
        ),
        (Method::POST, &create, "not json".into(), "object"),
        (Method::POST, &create, String::new(), "object"),
        (Method::PATCH, &patch, "{}".into(), "concurrentLimit"),
        (Method::PATCH, &patch, r#"{"plan":"enterprise"}"#.into(), "plan"),
        (
            Method::PATCH,
            &patch,
            r#"{"plan":"paid","concurrentLimit":-1}"#.into(),
            "concurrentLimit",
        ),
        (Method::PATCH, &patch, r#"{"name":"b"}"#.into(), "name"),
        (Method::POST, &keys, r#"{"name":""}"#.into(), "name"),
        (Method::POST, &keys, format!(r#"{{"name":"{long}"}}"#), "name"),
        (Method::POST, &keys, "{}".into(), "name"),
    ];
    let bearer = format!("Bearer {TOKEN}");
    for (method, path, body, field) in cases {
        let resp = call_with(
            &cloud,
            Some(&bearer),
            method.clone(),
            path,
            Some(&body),
        )
        .await;
        let (status, error, code) = error_body(resp).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "bad_request"),
            "{method} {path} {body}"
        );
        assert!(error.contains(field), "{body}: {error}");
    }
    assert_eq!(orgs(&cloud).await, before);
    let listed = call(&cloud, Method::GET, &keys, None, 200).await;
    assert_eq!(listed, json!([]));
}

async fn no_or_wrong_token_is_401_and_changes_nothing(backend: Backend) {
    let (cloud, _pg) = cloud(backend).await;
    let org = new_org(&cloud, "acme", "free", 2).await;
    let (key_id, key) = new_key(&cloud, &org).await;
    let before = orgs(&cloud).await;
    let jwks = cloud.edge.jwks();
    let good_org = r#"{"name":"x","plan":"paid","concurrentLimit":1}"#;
    let routes = [
        (Method::GET, "/internal/admin/orgs".to_owned(), None),
        (Method::POST, "/internal/admin/orgs".to_owned(), Some(good_org)),
        (
            Method::PATCH,
            format!("/internal/admin/orgs/{org}"),
            Some(r#"{"plan":"paid"}"#),
        ),
        (
            Method::POST,
            format!("/internal/admin/orgs/{org}/credits"),
            Some(r#"{"grant":5}"#),
        ),
        (Method::GET, format!("/internal/admin/orgs/{org}/keys"), None),
        (
            Method::POST,
            format!("/internal/admin/orgs/{org}/keys"),
            Some(r#"{"name":"x"}"#),
        ),
        (Method::DELETE, format!("/internal/admin/keys/{key_id}"), None),
        (Method::POST, "/internal/admin/keys/rotate".to_owned(), None),
    ];
    let wrong = "Bearer admin-token-0123456780".to_owned();
    let raw = TOKEN.to_owned();
    let basic = format!("Basic {TOKEN}");
    for (method, path, body) in &routes {
        for token in [None, Some(&wrong), Some(&raw), Some(&basic)] {
            let resp = call_with(
                &cloud,
                token.map(String::as_str),
                method.clone(),
                path,
                *body,
            )
            .await;
            let (status, error, code) = error_body(resp).await;
            assert_eq!(
                (status, code.as_str()),
                (401, "admin_unauthorized"),
                "{method} {path} {token:?}"
            );
            assert!(!error.is_empty());
        }
        // An API key is not an admin token.
        let resp = cloud
            .req_as(&key, method.clone(), path)
            .bearer_auth(&key)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 401, "{method} {path} with an API key");
    }
    assert_eq!(orgs(&cloud).await, before, "nothing changed");
    assert_eq!(cloud.edge.jwks(), jwks, "no key rotated");
    let resp = cloud.req_as(&key, Method::GET, "/api/sandboxes").send().await;
    assert_eq!(resp.expect("send").status(), 200, "key not revoked");

    // The one token also rotates the signing key.
    let rotated =
        call(&cloud, Method::POST, "/internal/admin/keys/rotate", None, 200)
            .await;
    assert_eq!(rotated["keys"].as_array().expect("keys").len(), 2);
    assert_ne!(cloud.edge.jwks(), jwks);
}

#[tokio::test]
async fn without_an_admin_token_every_operator_route_is_404() {
    let cloud = Cloud::start(&[CellKind::Fake]).await;
    let bearer = format!("Bearer {TOKEN}");
    for (method, path) in [
        (Method::GET, "/internal/admin/orgs"),
        (Method::POST, "/internal/admin/orgs"),
        (Method::PATCH, "/internal/admin/orgs/org-default"),
        (Method::GET, "/internal/admin/orgs/org-default/keys"),
        (Method::POST, "/internal/admin/orgs/org-default/keys"),
        (Method::DELETE, "/internal/admin/keys/key-1"),
        (Method::POST, "/internal/admin/keys/rotate"),
    ] {
        let resp =
            call_with(&cloud, Some(&bearer), method.clone(), path, Some("{}"))
                .await;
        let (status, _, code) = error_body(resp).await;
        assert_eq!(
            (status, code.as_str()),
            (404, "not_found"),
            "{method} {path}"
        );
    }
}

async fn keys_are_created_listed_and_revoked(backend: Backend) {
    let (cloud, _pg) = cloud(backend).await;
    let org = new_org(&cloud, "acme", "paid", 5).await;
    let path = format!("/internal/admin/orgs/{org}/keys");
    let made = call(
        &cloud,
        Method::POST,
        &path,
        Some(json!({"name": "ci bot"})),
        201,
    )
    .await;
    let key = made["key"].as_str().expect("key").to_owned();
    let key_id = made["id"].as_str().expect("id").to_owned();
    assert!(key.starts_with("cvm_") && key.len() == 68, "{made}");
    assert!(key.starts_with(made["prefix"].as_str().expect("prefix")));
    assert_eq!(
        (&made["orgId"], &made["name"]),
        (&json!(org), &json!("ci bot"))
    );
    assert_eq!(made["revokedAt"], Value::Null);
    let (other_id, _) = new_key(&cloud, &org).await;

    // Several keys per org, listed without their secrets.
    let list = call(&cloud, Method::GET, &path, None, 200).await;
    let list = list.as_array().expect("list").clone();
    assert_eq!(list.len(), 2);
    let first = list.iter().find(|k| k["id"] == key_id).expect("listed");
    let mut fields: Vec<&str> = first
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["createdAt", "id", "name", "orgId", "prefix", "revokedAt"]
    );
    assert_eq!(first["createdAt"], made["createdAt"]);
    let text = serde_json::to_string(&list).expect("json");
    assert!(!text.contains(&key[12..]), "the key never shows again");

    // The key works; a sandbox made with it, then the key revoked.
    let sb = {
        let resp = cloud
            .req_as(&key, Method::POST, "/api/sandboxes")
            .json(&json!({}))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 201);
        resp.json::<Value>().await.expect("json")["sandboxID"]
            .as_str()
            .expect("id")
            .to_owned()
    };
    let revoke = format!("/internal/admin/keys/{key_id}");
    assert_eq!(
        call(&cloud, Method::DELETE, &revoke, None, 204).await,
        Value::Null
    );
    assert_eq!(
        call(&cloud, Method::DELETE, &revoke, None, 204).await,
        Value::Null
    );
    for (method, path) in [
        (Method::GET, "/api/sandboxes".to_owned()),
        (Method::POST, "/api/sandboxes".to_owned()),
        (Method::GET, format!("/api/sandboxes/{sb}")),
        (Method::DELETE, format!("/api/sandboxes/{sb}")),
        (Method::GET, format!("/api/sandboxes/{sb}/usage")),
        (Method::POST, format!("/api/sandboxes/{sb}/token")),
        (Method::POST, format!("/api/sandboxes/{sb}/echo")),
        (Method::GET, "/api/usage".to_owned()),
    ] {
        let resp = cloud.req_as(&key, method.clone(), &path).send().await;
        let (status, _, code) = error_body(resp.expect("send")).await;
        assert_eq!(
            (status, code.as_str()),
            (401, "unauthorized"),
            "{method} {path}"
        );
        // In the query too (as browsers send it on WebSocket upgrades).
        let url = format!("{}{path}?api_key={key}", cloud.url);
        let resp = cloud.http.request(method.clone(), url).send().await;
        assert_eq!(
            resp.expect("send").status(),
            401,
            "{method} {path}?api_key"
        );
    }
    assert!(cloud.cell("cell-0").has(&sb), "nothing reached the cell");

    let list = call(&cloud, Method::GET, &path, None, 200).await;
    for k in list.as_array().expect("list") {
        let revoked = k["id"] == key_id;
        assert_eq!(k["revokedAt"].is_string(), revoked, "{k}");
        assert_eq!(k["id"] == other_id, !revoked);
    }

    let resp = call_with(
        &cloud,
        Some(&format!("Bearer {TOKEN}")),
        Method::DELETE,
        "/internal/admin/keys/key-0000000000000000",
        None,
    )
    .await;
    let (status, _, code) = error_body(resp).await;
    assert_eq!((status, code.as_str()), (404, "not_found"));
    for method in [Method::GET, Method::POST] {
        let resp = call_with(
            &cloud,
            Some(&format!("Bearer {TOKEN}")),
            method.clone(),
            "/internal/admin/orgs/org-nope/keys",
            Some(r#"{"name":"x"}"#),
        )
        .await;
        let (status, error, code) = error_body(resp).await;
        assert_eq!((status, code.as_str()), (404, "not_found"), "{method}");
        assert!(error.contains("org-nope"), "{error}");
    }
}

/// The create token the edge signs names the org's plan, so the cell
/// can keep paid sandboxes away from free-tier neighbours.
async fn create_tokens_carry_the_orgs_plan(backend: Backend) {
    let (cloud, _pg) = cloud(backend).await;
    let plan_of_create = |key: String| {
        let cloud = &cloud;
        async move {
            let resp = cloud
                .req_as(&key, Method::POST, "/api/sandboxes")
                .json(&json!({}))
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), 201);
            let state = &cloud.cell("cell-0").state;
            let claims = state.last_claims.lock().expect("lock").clone();
            let claims = claims.expect("the cell saw a token");
            assert_eq!(claims.scope, cellvm_token::Scope::Create);
            claims.plan
        }
    };
    let paid = new_org(&cloud, "payer", "paid", 5).await;
    let free = new_org(&cloud, "freeloader", "free", 5).await;
    let (_, paid_key) = new_key(&cloud, &paid).await;
    let (_, free_key) = new_key(&cloud, &free).await;
    assert_eq!(
        plan_of_create(paid_key.clone()).await.as_deref(),
        Some("paid")
    );
    assert_eq!(
        plan_of_create(free_key.clone()).await.as_deref(),
        Some("free")
    );
    assert_eq!(
        plan_of_create(cloud.key.clone()).await.as_deref(),
        Some("paid")
    );

    // A plan change reaches the next create.
    let path = format!("/internal/admin/orgs/{free}");
    call(&cloud, Method::PATCH, &path, Some(json!({"plan": "paid"})), 200)
        .await;
    assert_eq!(plan_of_create(free_key).await.as_deref(), Some("paid"));
}

/// Regression: `set` to i64::MAX then `grant 1` overflowed in the
/// database (SQLite made the sum a float) and every later read of the
/// org failed with 500.
async fn credit_changes_that_would_overflow_are_refused(backend: Backend) {
    let (cloud, _pg) = cloud(backend).await;
    let org = new_org(&cloud, "rich", "paid", 5).await;
    let path = format!("/internal/admin/orgs/{org}/credits");
    for body in [
        json!({"set": i64::MAX}),
        json!({"set": i64::MIN}),
        json!({"grant": i64::MAX}),
    ] {
        let v = call(&cloud, Method::POST, &path, Some(body), 400).await;
        assert_eq!(v["code"], "bad_request", "{v}");
    }
    call(
        &cloud,
        Method::POST,
        &path,
        Some(json!({"set": 1_000_000_000_000_000_i64})),
        200,
    )
    .await;
    call(&cloud, Method::POST, &path, Some(json!({"grant": 1})), 400).await;
    let all = orgs(&cloud).await;
    let mine = all
        .as_array()
        .and_then(|a| a.iter().find(|o| o["id"] == org.as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(mine["creditsMicros"], 1_000_000_000_000_000_i64, "{mine}");
}
