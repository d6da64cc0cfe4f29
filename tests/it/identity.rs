//! Who is connected, against the real binary: a connection's user (the token's `sub`)
//! and its bounded `info`, personal channels (`name#user`), `--max-connections-per-user`,
//! presence and join/leave, and the `[[namespace]]` table that switches them per prefix.

use crate::support;
use crate::support_http;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use support_http::Response;

const SECRET: &str = "herald-test-secret-0123456789abcdef";

fn token(claims: &Value) -> String {
    fresh_token(SECRET, claims.clone())
}

/// The answer to an upgrade of `/ws` with `token` (a refusal's body read to the close).
fn upgrade_status(server: &Server, token: &str) -> Response {
    let request = upgrade_request(&format!("/ws?token={token}"));
    let (mut stream, head) = request_head(server.addr(), request.as_bytes());
    let mut body = head.rest;
    if head.status != 101 {
        body.extend(assert_closed_within(&mut stream, Duration::from_secs(5)));
    }
    Response {
        status: head.status,
        headers: head.headers,
        body,
    }
}

#[test]
fn an_info_claim_that_is_not_a_small_object_is_refused_with_401() {
    let server = Server::start(&["--jwt-secret", SECRET]);
    for info in [json!("Ann"), json!({"bio": "x".repeat(1100)})] {
        let refused = upgrade_status(&server, &token(&json!({"sub":"ann","info":info})));
        refused.assert_api_error(401, "unauthorized");
        let message = refused.json()["message"].as_str().unwrap().to_owned();
        assert!(
            message.contains("info claim must be a JSON object of at most 1024 bytes"),
            "{message}"
        );
    }
}

#[tokio::test]
async fn a_personal_channel_needs_no_listing_and_refuses_other_users() {
    let server = Server::start(&["--jwt-secret", SECRET]);
    let ann = token(&json!({"sub":"ann"}));
    let bob = token(&json!({"sub":"bob","channels":["*"]}));
    let mut ann_ws = connect(server.addr(), &format!("/ws?token={ann}")).await;
    subscribe(&mut ann_ws, "inbox#ann", 1).await;
    let mut bob_ws = connect(server.addr(), &format!("/ws?token={bob}")).await;
    send_text(
        &mut bob_ws,
        r#"{"type":"subscribe","channel":"inbox#ann","id":2}"#,
    )
    .await;
    let refused = recv_json(&mut bob_ws).await;
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_u64()),
        (Some("forbidden"), Some(2))
    );
}

#[tokio::test]
async fn the_per_user_limit_refuses_with_429_and_counts_each_user_apart() {
    let server = Server::start(&["--jwt-secret", SECRET, "--max-connections-per-user", "2"]);
    let ann = token(&json!({"sub":"ann","channels":["*"]}));
    let first = connect(server.addr(), &format!("/ws?token={ann}")).await;
    let _second = connect(server.addr(), &format!("/ws?token={ann}")).await;
    let refused = upgrade_status(&server, &ann);
    refused.assert_api_error(429, "too_many_connections");
    assert!(refused.header("Retry-After").is_some(), "{refused:?}");
    let bob = upgrade_status(&server, &token(&json!({"sub":"bob"})));
    assert_eq!(bob.status, 101, "{bob:?}");
    drop(first);
    // The closed connection gives its place back once the server has seen it go.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let again = upgrade_status(&server, &ann);
        if again.status == 101 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{again:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn presence_and_join_leave_follow_clients_as_they_come_and_go() {
    let server = Server::start(&["--jwt-secret", SECRET, "--presence", "--join-leave"]);
    let ann =
        token(&json!({"sub":"ann","channels":["room"],"publish":["room"],"info":{"name":"Ann"}}));
    let bob = token(&json!({"sub":"bob","channels":["room"]}));
    let mut ann_ws = connect(server.addr(), &format!("/ws?token={ann}")).await;
    subscribe(&mut ann_ws, "room", 1).await;
    let own = recv_json(&mut ann_ws).await;
    assert_eq!(
        (own["type"].as_str(), own["user"].as_str()),
        (Some("join"), Some("ann"))
    );
    assert_eq!(own["info"], json!({"name":"Ann"}));
    let mut bob_ws = connect(server.addr(), &format!("/ws?token={bob}")).await;
    subscribe(&mut bob_ws, "room", 1).await;
    let joined = recv_json(&mut ann_ws).await;
    assert_eq!(
        (joined["type"].as_str(), joined["user"].as_str()),
        (Some("join"), Some("bob"))
    );

    send_text(
        &mut ann_ws,
        r#"{"type":"presence","channel":"room","id":2}"#,
    )
    .await;
    let page = recv_json(&mut ann_ws).await;
    assert_eq!(
        (page["type"].as_str(), page["id"].as_u64()),
        (Some("presence"), Some(2))
    );
    let mut users: Vec<&str> = page["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    users.sort_unstable();
    assert_eq!(users, ["ann", "bob"]);
    assert!(page["cursor"].is_null(), "{page}");

    // The publisher is a subscriber too: its ack and the message come in either order.
    send_text(
        &mut ann_ws,
        r#"{"type":"publish","channel":"room","data":"hi","id":3}"#,
    )
    .await;
    let mut kinds = vec![
        recv_json(&mut ann_ws).await["type"].clone(),
        recv_json(&mut ann_ws).await["type"].clone(),
    ];
    kinds.sort_by_key(|k| k.to_string());
    assert_eq!(kinds, [json!("ack"), json!("message")]);
    drop(bob_ws);
    let left = recv_json(&mut ann_ws).await;
    assert_eq!(
        (left["type"].as_str(), left["user"].as_str()),
        (Some("leave"), Some("bob"))
    );
    assert_eq!(left["conn"], joined["conn"]);
    send_text(
        &mut ann_ws,
        r#"{"type":"presence_stats","channel":"room","id":4}"#,
    )
    .await;
    let stats = recv_json(&mut ann_ws).await;
    assert_eq!(
        (stats["connections"].as_u64(), stats["users"].as_u64()),
        (Some(1), Some(1))
    );
}

/// A config file holding `text`, in a directory of its own that goes when this is
/// dropped.
struct ConfigFile(std::path::PathBuf);

impl ConfigFile {
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn config_file(name: &str, text: &str) -> ConfigFile {
    let dir = std::env::temp_dir().join(format!("herald-identity-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("herald.toml");
    std::fs::write(&file, text).unwrap();
    ConfigFile(file)
}

#[test]
fn an_unknown_namespace_key_stops_the_start_naming_the_key_and_the_line() {
    let file = config_file(
        "unknown",
        "[[namespace]]\nprefix = \"chat.\"\npresence = true\njoin_leaves = true\n",
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config", file.path()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 4"), "{stderr}");
    assert!(stderr.contains("unknown field `join_leaves`"), "{stderr}");
}

#[tokio::test]
async fn namespaces_switch_presence_join_leave_and_who_publishes() {
    let file = config_file(
        "namespaces",
        "[[namespace]]\nprefix = \"chat.\"\npresence = true\njoin_leave = true\npublish = \"subscribers\"\nexpose_publisher = true\n\n\
         [[namespace]]\nprefix = \"feed.\"\npublish = \"api\"\n",
    );
    let server = Server::start(&["--config", file.path(), "--jwt-secret", SECRET]);
    let claims = json!({"sub":"ann","channels":["chat.*","feed.*","news"],"publish":["feed.*"]});
    let mut ws = connect(server.addr(), &format!("/ws?token={}", token(&claims))).await;
    subscribe(&mut ws, "chat.a", 1).await;
    assert_eq!(recv_json(&mut ws).await["type"], "join");
    subscribe(&mut ws, "news", 2).await;
    send_text(
        &mut ws,
        r#"{"type":"presence_stats","channel":"news","id":3}"#,
    )
    .await;
    assert_eq!(recv_json(&mut ws).await["code"], "presence_disabled");
    // `subscribers`: the token lists no publish right to chat.*, subscribing is enough.
    send_text(
        &mut ws,
        r#"{"type":"publish","channel":"chat.a","data":1,"id":4}"#,
    )
    .await;
    let mut kinds = vec![
        recv_json(&mut ws).await["type"].clone(),
        recv_json(&mut ws).await["type"].clone(),
    ];
    kinds.sort_by_key(|k| k.to_string());
    assert_eq!(kinds, [json!("ack"), json!("message")]);
    // `api`: the token's publish claim is not enough.
    send_text(
        &mut ws,
        r#"{"type":"publish","channel":"feed.x","data":1,"id":5}"#,
    )
    .await;
    let refused = recv_json(&mut ws).await;
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_u64()),
        (Some("forbidden"), Some(5))
    );
}
