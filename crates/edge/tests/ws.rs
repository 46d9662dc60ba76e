//! The edge's forwarding of WebSocket sessions (exec attach, terminals)
//! and its path checks, against fake cells on loopback.

#![allow(clippy::wildcard_enum_match_arm)]

mod common;

use std::time::Duration;

use common::{CellKind, Cloud};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::{self as ts, protocol::CloseFrame};

use CellKind::Fake;

type Ws = tokio_tungstenite::WebSocketStream<
    tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
>;

fn ws_url(cloud: &Cloud, path: &str) -> String {
    format!("{}{path}", cloud.url.replacen("http://", "ws://", 1))
}

/// Opens `path` at the edge with the key as `X-API-Key`.
async fn connect(cloud: &Cloud, path: &str) -> Result<Ws, ts::Error> {
    let mut req = ws_url(cloud, path).into_client_request().expect("url");
    req.headers_mut()
        .insert("x-api-key", cloud.key.parse().expect("header value"));
    tokio_tungstenite::connect_async(req).await.map(|(s, _)| s)
}

/// The status and JSON body of a refused upgrade.
fn refusal(err: ts::Error) -> (u16, serde_json::Value) {
    let ts::Error::Http(resp) = err else { panic!("not refused: {err}") };
    let body = resp.body().clone().unwrap_or_default();
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("json body {body:?}: {e}"));
    (resp.status().as_u16(), json)
}

async fn next_msg(ws: &mut Ws) -> ts::Message {
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a frame in time")
        .expect("open")
        .expect("frame")
}

#[tokio::test]
async fn binary_frames_round_trip_through_edge_and_cell() {
    let cloud = Cloud::start(&[Fake]).await;
    let id = cloud.create(json!({})).await.sandbox_id;
    let mut ws = connect(&cloud, &format!("/api/sandboxes/{id}/pty/s1"))
        .await
        .expect("upgrade");
    let payload: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    ws.send(ts::Message::Binary(payload.clone().into())).await.expect("send");
    assert_eq!(next_msg(&mut ws).await, ts::Message::Binary(payload.into()));
    ws.send(ts::Message::Text("ok".into())).await.expect("send");
    assert_eq!(next_msg(&mut ws).await, ts::Message::Text("ok".into()));
    // The cell got a token for this sandbox (checked by the fake cell)
    // and never the key.
    let seen = cloud.cell("cell-0").state.session_seen.lock().expect("lock");
    assert_eq!(seen[0].0, format!("/api/sandboxes/{id}/pty/s1"));
    assert!(!seen[0].2, "the API key reached the cell");
}

#[tokio::test]
async fn api_key_in_the_query_works_and_is_stripped() {
    let cloud = Cloud::start(&[Fake]).await;
    let id = cloud.create(json!({})).await.sandbox_id;
    let url = ws_url(
        &cloud,
        &format!("/api/sandboxes/{id}/exec/s2?a=1&api_key={}&b=2", cloud.key),
    );
    let (mut ws, _) =
        tokio_tungstenite::connect_async(url).await.expect("upgrade");
    ws.send(ts::Message::Binary(vec![0, b'x'].into())).await.expect("send");
    assert_eq!(
        next_msg(&mut ws).await,
        ts::Message::Binary(vec![0, b'x'].into())
    );
    let seen = cloud.cell("cell-0").state.session_seen.lock().expect("lock");
    assert_eq!(seen[0].1, "a=1&b=2");
    assert!(!seen[0].2);
}

#[tokio::test]
async fn close_codes_and_reasons_pass_both_ways() {
    let cloud = Cloud::start(&[Fake]).await;
    let id = cloud.create(json!({})).await.sandbox_id;
    let path = format!("/api/sandboxes/{id}/pty/s1");
    let mut ws = connect(&cloud, &path).await.expect("upgrade");
    ws.send(ts::Message::Text("close".into())).await.expect("send");
    match next_msg(&mut ws).await {
        ts::Message::Close(Some(f)) => {
            assert_eq!((u16::from(f.code), f.reason.as_str()), (4000, "done"));
        }
        other => panic!("expected a close, got {other:?}"),
    }

    let mut ws = connect(&cloud, &path).await.expect("upgrade");
    let frame = CloseFrame { code: 4001.into(), reason: "client bye".into() };
    ws.send(ts::Message::Close(Some(frame))).await.expect("send");
    match next_msg(&mut ws).await {
        ts::Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 4001),
        other => panic!("expected the close echoed, got {other:?}"),
    }
    let state = &cloud.cell("cell-0").state;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let closes = state.session_closes.lock().expect("lock").clone();
        if closes.contains(&(4001, "client bye".into())) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{closes:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn refusals_answer_status_and_json_before_upgrading() {
    let cloud = Cloud::start(&[Fake]).await;
    let id = cloud.create(json!({})).await.sandbox_id;
    // The cell refuses: its status and body come through.
    let err = connect(&cloud, &format!("/api/sandboxes/{id}/pty/refuse"))
        .await
        .expect_err("refused");
    let (status, body) = refusal(err);
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("session_not_found"))
    );

    // No key, a wrong key: 401 from the edge itself.
    let path = format!("/api/sandboxes/{id}/pty/s1");
    let err = tokio_tungstenite::connect_async(ws_url(&cloud, &path))
        .await
        .expect_err("no key");
    assert_eq!(refusal(err).0, 401);
    let url =
        ws_url(&cloud, &format!("{path}?api_key=cvm_{}", "ab".repeat(32)));
    let err =
        tokio_tungstenite::connect_async(url).await.expect_err("wrong key");
    let (status, body) = refusal(err);
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));

    // Another org's sandbox: 404, as for every other call.
    let store = cloud.edge.store();
    let other =
        store.create_org("other", cellvm_edge::Plan::Free, 5).expect("org");
    let theirs = store.create_api_key(&other.id, "t").expect("key").key;
    let url = ws_url(&cloud, &format!("{path}?api_key={theirs}"));
    let err = tokio_tungstenite::connect_async(url).await.expect_err("404");
    assert_eq!(refusal(err).0, 404);
    let seen = cloud.cell("cell-0").state.session_seen.lock().expect("lock");
    assert_eq!(seen.len(), 1, "only the refused session reached the cell");
}

/// Sends `path` as written (no client-side normalisation) and returns
/// the status and body.
async fn raw_get(cloud: &Cloud, path: &str) -> (u16, String) {
    let addr = cloud.url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {}\r\n\
         Connection: close\r\n\r\n",
        cloud.key
    );
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line: {answer}"));
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[tokio::test]
async fn dot_segments_and_odd_paths_never_reach_the_cell() {
    let cloud = Cloud::start(&[Fake]).await;
    let id = cloud.create(json!({})).await.sandbox_id;
    let other = cloud.create(json!({})).await.sandbox_id;
    for rest in [
        "../../healthz",
        "../../../healthz",
        &format!("../{other}/echo") as &str,
        &format!("../{id}/echo"),
        "%2e%2e/%2E%2E/healthz",
        ".%2e/x",
        "./echo",
        "echo/.",
        "/echo",
        "echo//x",
        "echo\\..",
        "a%2f..%2fecho",
        "a%5c..",
    ] {
        let (status, body) =
            raw_get(&cloud, &format!("/api/sandboxes/{id}/{rest}")).await;
        assert_eq!(status, 400, "{rest}: {body}");
        assert!(body.contains("\"code\":\"bad_request\""), "{rest}: {body}");
    }
    // Plain paths still work the raw way too.
    let (status, body) =
        raw_get(&cloud, &format!("/api/sandboxes/{id}/echo?x=1")).await;
    assert_eq!(status, 200, "{body}");
    let seen = cloud.cell("cell-0").state.echo_seen.lock().expect("lock");
    assert_eq!(seen.len(), 1, "only the plain call reached the cell");
}

/// Frames the cell sends at once (an exec attach's replay and `0x04`)
/// must not reach the client in the same read as the `101`: clients on
/// the `ws` package (the OpenComputer SDK on Node) drop those unseen.
#[tokio::test]
async fn first_frame_does_not_ride_with_the_handshake() {
    let cloud = Cloud::start(&[Fake]).await;
    let id = cloud.create(json!({})).await.sandbox_id;
    let addr = cloud.url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let req = format!(
        "GET /api/sandboxes/{id}/exec/greet?api_key={} HTTP/1.1\r\n\
         Host: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        cloud.key
    );
    stream.write_all(req.as_bytes()).await.expect("write");
    // Read late, as a busy client does, so that anything the edge sends
    // right after the 101 is already waiting in the same read.
    tokio::time::sleep(Duration::from_millis(25)).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = tokio::time::timeout(
            Duration::from_secs(10),
            stream.read(&mut buf),
        )
        .await
        .expect("answer in time")
        .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        &got[head_end..],
        &[] as &[u8],
        "a frame arrived in the same read as the 101"
    );
    let n =
        tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("frame in time")
            .expect("read");
    // FIN + binary, unmasked, length 1, payload 0x04.
    assert_eq!(&buf[..n], &[0x82, 0x01, 0x04]);
}

/// Regression (issue 3): the edge accepted messages of up to 64 MiB
/// while the worker behind it allowed less, and the client got a
/// misleading close reason. The edge is the first hop: it closes
/// with 1009 and says the limit; the cell only sees the client leave,
/// and the session's other clients go on.
#[tokio::test]
async fn oversized_message_is_closed_1009_at_the_edge() {
    let max = cellvm_wire::api::limits::MAX_WS_MESSAGE;
    let cloud = Cloud::start(&[Fake]).await;
    let id = cloud.create(json!({})).await.sandbox_id;
    let path = format!("/api/sandboxes/{id}/pty/s1");
    let mut big = connect(&cloud, &path).await.expect("upgrade");
    let mut other = connect(&cloud, &path).await.expect("upgrade");

    // Exactly the limit passes every hop.
    let at_limit = ts::Message::Binary(vec![1u8; max].into());
    big.send(at_limit.clone()).await.expect("send");
    assert_eq!(next_msg(&mut big).await, at_limit);

    // One byte more is refused at the edge.
    let _ = big.send(ts::Message::Binary(vec![2u8; max + 1].into())).await;
    match next_msg(&mut big).await {
        ts::Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 1009);
            assert!(f.reason.contains(&max.to_string()), "{}", f.reason);
        }
        other => panic!("expected a close, got {other:?}"),
    }
    other.send(ts::Message::Text("still".into())).await.expect("send");
    assert_eq!(next_msg(&mut other).await, ts::Message::Text("still".into()));

    let cell = &cloud.cell("cell-0").state;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let closes = loop {
        let closes = cell.session_closes.lock().expect("lock").clone();
        if !closes.is_empty() || tokio::time::Instant::now() > deadline {
            break closes;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(closes.len(), 1, "{closes:?}");
    assert_eq!(closes[0].0, 1001, "{closes:?}");
}
