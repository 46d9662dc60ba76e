//! Cells and the edge together on loopback: real cells register with a
//! real edge, and verify the tokens it signs (through key rotation).
//!
//! The cells run without workers: every check here happens before a
//! worker is needed, and a sandbox the cell does not hold answers 404
//! only once the token has passed (401 otherwise).

#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use cellvm_cell::CellConfig;
use cellvm_edge::store::NewSandbox;
use cellvm_edge::{Edge, EdgeConfig};
use cellvm_token::{Claims, Scope, SigningKey};
use cellvm_wire::api::{SandboxStatus, SandboxToken};
use reqwest::StatusCode;
use tokio::net::TcpListener;

const ADMIN: &str = "admin-secret-0123456789";

fn secret(cell: &str) -> String {
    format!("{cell}-secret-0123456789")
}

struct World {
    edge: Edge,
    url: String,
    key: String,
    cells: BTreeMap<String, String>,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

async fn bind() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

/// An edge that lets `cells` register, and those cells, registering
/// every second.
async fn world(cells: &[(&str, &str)]) -> World {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EdgeConfig {
        data_dir: dir.path().join("edge"),
        admin: cellvm_edge::AdminConfig { token: Some(ADMIN.into()) },
        ..EdgeConfig::default()
    };
    for (id, _) in cells {
        config.ingest.cell_secrets.insert((*id).into(), secret(id));
    }
    let edge = Edge::open(config).unwrap();
    let key = edge.store().bootstrap_default_org_key(None).unwrap().key;
    let (listener, url) = bind().await;
    tokio::spawn(edge.clone().serve(listener, std::future::pending()));
    let mut urls = BTreeMap::new();
    for (id, region) in cells {
        let (listener, cell_url) = bind().await;
        let cfg = CellConfig {
            id: (*id).into(),
            provider: "test".into(),
            region: (*region).into(),
            listen: listener.local_addr().unwrap(),
            public_url: None,
            edge_url: url.clone(),
            edge_secret: Some(secret(id)),
            register_interval_s: 1,
            worker_secret: "worker-secret-0123456789".into(),
            database: dir.path().join(format!("{id}.sqlite3")),
            worker_stale_s: 60,
            placement: cellvm_placement::Weights::default(),
            checkpoints: None,
            events: cellvm_cell::EventsConfig::default(),
        };
        tokio::spawn(cellvm_cell::serve(
            cfg,
            listener,
            std::future::pending(),
        ));
        urls.insert((*id).to_owned(), cell_url);
    }
    let http = reqwest::Client::new();
    World { edge, url, key, cells: urls, http, dir }
}

impl World {
    /// Waits until every cell has registered.
    async fn registered(&self) {
        for _ in 0..100 {
            let known = self.edge.store().registered_cells().unwrap();
            if known.len() == self.cells.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cells did not register");
    }

    /// A sandbox of the default org that the index places on `cell`.
    fn sandbox_on(&self, cell: &str) -> String {
        let id = format!("sb-{:016x}", rand_u64());
        let store = self.edge.store();
        let new = NewSandbox {
            id: id.clone(),
            org_id: cellvm_edge::store::DEFAULT_ORG_ID.into(),
            template: "base".into(),
            cpu_count: 1,
            memory_mb: 512,
            disk_mb: 1024,
            timeout_s: 0,
            metadata: BTreeMap::new(),
        };
        store.insert_pending(&new, cellvm_token::now_s()).unwrap();
        store.set_attempt(&id, cell).unwrap();
        store.set_status(&id, SandboxStatus::Running).unwrap();
        id
    }

    /// A fresh token for `id` from the edge's refresh route.
    async fn token(&self, id: &str) -> SandboxToken {
        let resp = self
            .http
            .post(format!("{}/api/sandboxes/{id}/token", self.url))
            .header("x-api-key", &self.key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    /// What cell `cell` answers to `GET /api/sandboxes/{id}` with
    /// `token`: 404 means the token passed.
    async fn cell_get(&self, cell: &str, id: &str, token: &str) -> u16 {
        let url = format!("{}/api/sandboxes/{id}", self.cells[cell]);
        let resp = self.http.get(url).bearer_auth(token).send().await.unwrap();
        resp.status().as_u16()
    }

    async fn rotate(&self, secret: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/internal/admin/keys/rotate", self.url))
            .bearer_auth(secret)
            .send()
            .await
            .unwrap()
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher as _, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

#[tokio::test]
async fn cells_register_and_the_edge_hands_out_their_urls() {
    let w =
        world(&[("aws-use1-01", "us-east-1"), ("gcp-euw1-01", "eu")]).await;
    w.registered().await;
    let cells = w.edge.store().registered_cells().unwrap();
    let a = cells.iter().find(|c| c.id == "aws-use1-01").unwrap();
    assert_eq!(a.region, "us-east-1");
    assert_eq!(a.url, w.cells["aws-use1-01"]);
    let id = w.sandbox_on("gcp-euw1-01");
    let t = w.token(&id).await;
    assert_eq!(t.cell_id, "gcp-euw1-01");
    assert_eq!(t.connect_url, w.cells["gcp-euw1-01"]);
    assert_eq!(w.cell_get("gcp-euw1-01", &id, &t.token).await, 404);

    // A wrong secret, or a cell the edge does not know, is refused.
    let reg = serde_json::json!({
        "id": "aws-use1-01", "provider": "aws", "region": "x",
        "url": "http://127.0.0.1:1"
    });
    let url = format!("{}{}", w.url, cellvm_wire::cells::REGISTER_PATH);
    for (body, secret) in [
        (reg.clone(), secret("gcp-euw1-01")),
        (
            serde_json::json!({"id": "evil-01", "provider": "a",
            "region": "b", "url": "http://x"}),
            secret("evil-01"),
        ),
    ] {
        let resp = w
            .http
            .post(&url)
            .bearer_auth(secret)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let cells = w.edge.store().registered_cells().unwrap();
    assert_eq!(cells.len(), 2);
    assert!(cells.iter().all(|c| c.region != "x"));
}

#[tokio::test]
async fn a_token_works_only_at_its_cell_for_its_sandbox_until_it_expires() {
    let w = world(&[("cell-a", "r1"), ("cell-b", "r2")]).await;
    w.registered().await;
    let id = w.sandbox_on("cell-a");
    let other = w.sandbox_on("cell-a");
    let t = w.token(&id).await;
    assert!(t.expires_at > cellvm_token::now_s());
    assert_eq!(w.cell_get("cell-a", &id, &t.token).await, 404, "passes");
    assert_eq!(w.cell_get("cell-b", &id, &t.token).await, 401, "cell B");
    assert_eq!(w.cell_get("cell-a", &other, &t.token).await, 401, "other");

    // Signed by the edge's own key, but expired (beyond the leeway).
    let key =
        SigningKey::load(&w.dir.path().join("edge/signing.key")).unwrap();
    let then = cellvm_token::now_s() - 3600;
    let claims =
        Claims::new(Scope::Sandbox, "cell-a", &id, "org-default", then, 60);
    let expired = key.sign(&claims);
    assert_eq!(w.cell_get("cell-a", &id, &expired).await, 401, "expired");
    let fresh = Claims::new(
        Scope::Sandbox,
        "cell-a",
        &id,
        "org-default",
        cellvm_token::now_s(),
        60,
    );
    assert_eq!(w.cell_get("cell-a", &id, &key.sign(&fresh)).await, 404);
}

#[tokio::test]
async fn a_rotation_does_not_break_tokens_in_flight() {
    let w = world(&[("cell-a", "r1")]).await;
    w.registered().await;
    let id = w.sandbox_on("cell-a");
    let before = w.token(&id).await.token;
    assert_eq!(w.cell_get("cell-a", &id, &before).await, 404);

    assert_eq!(w.rotate("wrong-secret-0123456789").await.status(), 401);
    let resp = w.rotate(ADMIN).await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let kid = body["kid"].as_str().unwrap().to_owned();
    assert_eq!(body["keys"].as_array().unwrap().len(), 2, "{body}");

    // New tokens use the new key; the cell learns it on first sight,
    // and the token minted before the rotation keeps working.
    let after = w.token(&id).await.token;
    assert_ne!(after, before);
    assert!(header_kid(&after) == kid);
    assert_eq!(w.cell_get("cell-a", &id, &after).await, 404, "new key");
    assert_eq!(w.cell_get("cell-a", &id, &before).await, 404, "old key");
    let jwks = w.edge.jwks();
    assert_eq!(jwks.keys.len(), 2);
}

/// The `kid` in a token's header.
fn header_kid(token: &str) -> String {
    use base64::Engine as _;
    let head = token.split('.').next().unwrap();
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["kid"].as_str().unwrap().to_owned()
}
