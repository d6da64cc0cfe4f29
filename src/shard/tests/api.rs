//! The server API on the in-memory harness: orders gathered from every shard, queries
//! answered by homes.

use super::identity::{token, with_tokens};
use super::*;

const KEY: &str = "api-key";

fn api_config() -> Config {
    let mut config = with_tokens(Config::default());
    config.api_key = Some(KEY.into());
    config.namespaces.default.presence = true;
    config
}

/// `method path` with the API key and `body`: (status, body).
fn call(cluster: &mut Cluster, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (_, response) = http(cluster, 0, &request);
    let status = response[9..12].parse().unwrap();
    let json = &response[response.find("\r\n\r\n").unwrap() + 4..];
    (status, serde_json::from_str(json).unwrap())
}

fn user(cluster: &mut Cluster, shard: usize, name: &str, channel: &str) -> Client {
    let client = cluster.connect(shard, &format!("/ws?token={}", token(name, &["*"], None)));
    cluster.send(
        client,
        &format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#),
    );
    cluster.settle();
    cluster.take_output(client);
    client
}

fn close_code(frames: &[harness::Frame]) -> Option<(u16, String)> {
    frames
        .iter()
        .find(|(op, _)| *op == OpCode::Close)
        .map(|(_, p)| {
            (
                u16::from_be_bytes([p[0], p[1]]),
                String::from_utf8_lossy(&p[2..]).into_owned(),
            )
        })
}

#[test]
fn disconnect_closes_a_users_connections_on_every_shard() {
    let mut cluster = Cluster::new(3, api_config());
    let ann: Vec<Client> = (0..3).map(|s| user(&mut cluster, s, "ann", "c")).collect();
    let bob = user(&mut cluster, 1, "bob", "c");
    let (status, body) = call(
        &mut cluster,
        "POST",
        "/api/disconnect",
        r#"{"user":"ann","code":4009,"reason":"banned"}"#,
    );
    assert_eq!(
        (status, body),
        (200, serde_json::json!({"disconnected": 3}))
    );
    for client in ann {
        let frames = cluster.frames(client);
        assert_eq!(close_code(&frames), Some((4009, "banned".into())));
    }
    assert_eq!(close_code(&cluster.frames(bob)), None);
    // One connection, by the id presence gives.
    let (_, page) = call(&mut cluster, "GET", "/api/presence?channel=c", "");
    let members = page["members"].as_array().unwrap();
    assert_eq!(members.len(), 1, "{page}");
    let conn = members[0]["conn"].as_str().unwrap();
    let (_, body) = call(
        &mut cluster,
        "POST",
        "/api/disconnect",
        &format!(r#"{{"conn":"{conn}"}}"#),
    );
    assert_eq!(body["disconnected"], 1);
    assert_eq!(close_code(&cluster.frames(bob)).map(|c| c.0), Some(4000));
    let (_, body) = call(
        &mut cluster,
        "POST",
        "/api/disconnect",
        r#"{"conn":"9.1.1"}"#,
    );
    assert_eq!(body["disconnected"], 0, "no such shard");
}

#[test]
fn unsubscribe_takes_a_user_out_of_a_channel_only() {
    let mut cluster = Cluster::new(2, api_config());
    let a = user(&mut cluster, 0, "ann", "c");
    let b = user(&mut cluster, 1, "ann", "c");
    cluster.send(b, r#"{"type":"subscribe","channel":"d"}"#);
    cluster.settle();
    cluster.take_output(b);
    let (status, body) = call(
        &mut cluster,
        "POST",
        "/api/unsubscribe",
        r#"{"user":"ann","channel":"c"}"#,
    );
    assert_eq!((status, body["unsubscribed"].as_u64()), (200, Some(2)));
    for client in [a, b] {
        assert_eq!(
            cluster.texts(client),
            [r#"{"type":"unsubscribed","channel":"c"}"#]
        );
    }
    let (_, stats) = call(&mut cluster, "GET", "/api/presence_stats?channel=d", "");
    assert_eq!(stats["connections"], 1, "still in d: {stats}");
}

#[test]
fn channels_are_listed_from_every_home_in_pages() {
    let mut cluster = Cluster::new(3, api_config());
    for i in 0..7 {
        user(&mut cluster, i % 3, "ann", &format!("room.{i}"));
    }
    user(&mut cluster, 0, "bob", "other");
    user(&mut cluster, 1, "cid", "room.3");
    let mut listed = Vec::new();
    let mut path = "/api/channels?pattern=room.*&limit=3".to_owned();
    loop {
        let (status, page) = call(&mut cluster, "GET", &path, "");
        assert_eq!(status, 200, "{page}");
        for c in page["channels"].as_array().unwrap() {
            listed.push((
                c["channel"].as_str().unwrap().to_owned(),
                c["subscribers"].as_u64().unwrap(),
            ));
        }
        match page["cursor"].as_str() {
            Some(cursor) => path = format!("/api/channels?pattern=room.*&limit=3&cursor={cursor}"),
            None => break,
        }
    }
    let expected: Vec<(String, u64)> = (0..7)
        .map(|i| (format!("room.{i}"), if i == 3 { 2 } else { 1 }))
        .collect();
    assert_eq!(listed, expected);
}

#[test]
fn history_is_read_bounded_and_newest_first_on_request() {
    let mut cluster = Cluster::new(2, api_config());
    let ann = user(&mut cluster, 0, "ann", "c");
    for n in 1..=5 {
        cluster.send(
            ann,
            &format!(r#"{{"type":"publish","channel":"c","data":{n}}}"#),
        );
    }
    cluster.settle();
    let (_, page) = call(
        &mut cluster,
        "GET",
        "/api/history?channel=c&since=1&limit=2",
        "",
    );
    let data = |page: &serde_json::Value| -> Vec<u64> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["data"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(data(&page), [2, 3]);
    assert_eq!(
        (page["seq"].as_u64(), page["epoch"].as_str()),
        (Some(5), Some("e1"))
    );
    let (_, newest) = call(
        &mut cluster,
        "GET",
        "/api/history?channel=c&limit=2&newest_first=true",
        "",
    );
    assert_eq!(data(&newest), [5, 4]);
    let (status, error) = call(&mut cluster, "GET", "/api/history?channel=c&limit=5000", "");
    assert_eq!((status, error["code"].as_str()), (400, Some("bad_request")));
    let (_, none) = call(&mut cluster, "GET", "/api/history?channel=never", "");
    assert_eq!(data(&none), Vec::<u64>::new());
    assert!(
        cluster.shards.iter().all(|s| s.channels.len() <= 1),
        "asking created nothing"
    );
}

#[test]
fn the_api_needs_its_key() {
    let mut cluster = Cluster::new(1, with_tokens(Config::default()));
    let (status, body) = call(&mut cluster, "GET", "/api/info", "");
    assert_eq!((status, body["code"].as_str()), (403, Some("api_disabled")));
    let mut cluster = Cluster::new(2, api_config());
    let request = "GET /api/info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n\r\n";
    let (_, response) = http(&mut cluster, 0, request);
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    let mut off = with_tokens(Config::default());
    off.api_key = Some(KEY.into());
    let mut without_presence = Cluster::new(1, off);
    let (status, body) = call(&mut without_presence, "GET", "/api/presence?channel=c", "");
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("presence_disabled"))
    );
    let (status, info) = call(&mut cluster, "GET", "/api/info", "");
    assert_eq!(
        (status, info["shards"].as_u64(), info["epoch"].as_str()),
        (200, Some(2), Some("e1"))
    );
}

#[test]
fn a_client_that_may_subscribe_reads_history_over_the_websocket() {
    let mut cluster = Cluster::new(2, api_config());
    let ann = user(&mut cluster, 0, "ann", "c");
    for n in 1..=3 {
        cluster.send(
            ann,
            &format!(r#"{{"type":"publish","channel":"c","data":{n}}}"#),
        );
    }
    cluster.settle();
    cluster.take_output(ann);
    cluster.send(
        ann,
        r#"{"type":"history","channel":"c","limit":2,"newest_first":true,"id":9}"#,
    );
    cluster.settle();
    let texts = cluster.texts(ann);
    let answer: serde_json::Value = serde_json::from_str(&texts[0]).unwrap();
    assert_eq!(
        (answer["type"].as_str(), answer["id"].as_u64()),
        (Some("history"), Some(9))
    );
    let seqs: Vec<u64> = answer["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [3, 2]);
    let limited = cluster.connect(1, &format!("/ws?token={}", token("bob", &["other"], None)));
    cluster.send(limited, r#"{"type":"history","channel":"c","id":1}"#);
    cluster.settle();
    assert!(cluster.texts(limited)[0].contains(r#""code":"forbidden""#));
}
