//! The server API against the real binary (`--api-key`): disconnect and unsubscribe by
//! user, presence, history and channels read over HTTP, node info, and the refusal of
//! these endpoints (503) while a node's Redis is unreachable. In a cluster they are
//! tested in `cluster_identity.rs`.

use crate::support;
use crate::support_http;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use support_http::{HttpConn, Response};

const SECRET: &str = "herald-test-secret-0123456789abcdef";
const KEY: &str = "api-test-key";

fn token(user: &str) -> String {
    fresh_token(
        SECRET,
        json!({"sub": user, "channels": ["*"], "publish": ["*"]}),
    )
}

fn server() -> Server {
    Server::start(&["--jwt-secret", SECRET, "--api-key", KEY, "--presence"])
}

async fn call(server: &Server, method: &str, target: &str, body: &str) -> Response {
    support_http::api_call(server.addr(), KEY, method, target, body).await
}

async fn user(server: &Server, name: &str, channel: &str) -> Ws {
    let mut ws = connect(server.addr(), &format!("/ws?token={}", token(name))).await;
    subscribe(&mut ws, channel, 1).await;
    ws
}

#[tokio::test]
async fn disconnect_and_unsubscribe_reach_every_connection_of_a_user() {
    let server = server();
    let mut ann: Vec<Ws> = Vec::new();
    for _ in 0..4 {
        ann.push(user(&server, "ann", "room").await);
    }
    let mut bob = user(&server, "bob", "room").await;
    let unsubscribed = call(
        &server,
        "POST",
        "/api/unsubscribe",
        r#"{"user":"bob","channel":"room"}"#,
    )
    .await;
    assert_eq!(unsubscribed.json(), json!({"unsubscribed": 1}));
    assert_eq!(
        recv_json(&mut bob).await,
        json!({"type":"unsubscribed","channel":"room"})
    );
    let disconnected = call(
        &server,
        "POST",
        "/api/disconnect",
        r#"{"user":"ann","code":4403,"reason":"banned"}"#,
    )
    .await;
    assert_eq!(disconnected.json(), json!({"disconnected": 4}));
    for ws in &mut ann {
        assert_eq!(recv_close_code(ws, Duration::from_secs(5)).await, 4403);
    }
    ping_pong(&mut bob).await;
    let stats = call(&server, "GET", "/api/presence_stats?channel=room", "").await;
    assert_eq!(stats.json()["connections"], 0, "{}", stats.text());
}

#[tokio::test]
async fn presence_history_channels_and_info_answer_over_http() {
    let server = server();
    let _ann = user(&server, "ann", "news").await;
    let _bob = user(&server, "bob", "news").await;
    for n in 1..=3 {
        let body = format!(r#"{{"channel":"news","data":{n}}}"#);
        let receipt = call(&server, "POST", "/api/publish", &body).await;
        assert_eq!(receipt.json()["seq"], n, "{}", receipt.text());
    }
    let presence = call(&server, "GET", "/api/presence?channel=news&limit=1", "").await;
    let page = presence.json();
    assert_eq!(page["members"].as_array().unwrap().len(), 1, "{page}");
    let cursor = page["cursor"].as_str().expect("a second page").to_owned();
    let rest = call(
        &server,
        "GET",
        &format!("/api/presence?channel=news&cursor={cursor}"),
        "",
    )
    .await;
    assert_eq!(rest.json()["members"].as_array().unwrap().len(), 1);
    assert!(rest.json()["cursor"].is_null());

    let history = call(&server, "GET", "/api/history?channel=news&since=1", "")
        .await
        .json();
    let data: Vec<&Value> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["data"])
        .collect();
    assert_eq!(data, [&json!(2), &json!(3)]);
    call(&server, "GET", "/api/history?channel=news&limit=100000", "")
        .await
        .assert_api_error(400, "bad_request");

    let channels = call(&server, "GET", "/api/channels?pattern=news", "")
        .await
        .json();
    assert_eq!(
        channels,
        json!({"channels":[{"channel":"news","subscribers":2}],"cursor":null})
    );
    let info = call(&server, "GET", "/api/info", "").await.json();
    // Connections count this request's own too.
    assert_eq!(
        (info["shards"].as_u64(), info["subscriptions"].as_u64()),
        (Some(2), Some(2)),
        "{info}"
    );
    assert!(info["connections"].as_u64() >= Some(2), "{info}");
}

#[tokio::test]
async fn without_the_key_or_with_redis_down_the_api_refuses_clearly() {
    let plain = Server::start(&[]);
    let (addr, target) = (plain.addr(), "/api/presence?channel=a");
    let off = blocking(move || HttpConn::connect(addr).get(target, Duration::from_secs(5))).await;
    off.assert_api_error(403, "api_disabled");

    // Nothing listens on this Redis port: the node starts degraded, and refuses what
    // only Redis can answer.
    let clustered = Server::start(&[
        "--api-key",
        KEY,
        "--redis",
        "redis://127.0.0.1:9",
        "--presence",
    ]);
    let refused = call(&clustered, "GET", "/api/presence?channel=a", "").await;
    refused.assert_api_error(503, "unavailable");
    assert!(
        refused.text().contains("Redis is unreachable"),
        "{}",
        refused.text()
    );
    let info = call(&clustered, "GET", "/api/info", "").await;
    assert_eq!(info.status, 200, "{}", info.text());
    let info = info.json();
    assert!(
        info["nodes"].is_null() && info["node"].is_string(),
        "{info}"
    );
    let mut ws = connect_ws(clustered.addr()).await;
    send_text(&mut ws, r#"{"type":"presence_stats","channel":"a","id":1}"#).await;
    let answer = recv_json(&mut ws).await;
    assert_eq!(answer["code"], "unavailable", "{answer}");
}
