//! State that stays right, against the real binary: a `recovery = "latest"` namespace
//! hands a subscriber without `since` the channel's latest message on `/ws`, `/sse` and
//! `/poll`, also long after the history TTL would have expired, on one node and with
//! `--redis`; and `expect_seq` on `/ws` and `POST /api/publish` under concurrent
//! read-modify-write publishers loses no update and tells every loser `conflict` with
//! the channel's current seq, on one node and across two nodes of a cluster.

use crate::support;
use crate::support_http;
use crate::support_redis;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use support_http::HttpConn;
use support_redis::{Redis, require_redis};

const API_KEY: &str = "state-key";
/// The history TTL of every test server: short, so "after it expired" is a short wait.
const TTL_MS: &str = "300";

/// A config file with a `latest` namespace for `state.`, in a directory of its own.
fn config_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-state-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("herald.toml");
    std::fs::write(
        &file,
        "[[namespace]]\nprefix = \"state.\"\nrecovery = \"latest\"\n",
    )
    .unwrap();
    file
}

/// A node with the `state.` namespace, the short TTL, the API key and `extra`; with
/// `--redis` it is returned once its Redis link is up.
fn node(name: &str, extra: &[&str]) -> Server {
    let file = config_file(name);
    let mut args = vec![
        "--config",
        file.to_str().unwrap(),
        "--history-ttl-ms",
        TTL_MS,
        "--api-key",
        API_KEY,
        // A read-modify-write client on loopback publishes faster than the default 100/s.
        "--max-messages-per-second",
        "100000",
    ];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    // Read once at the start: the file is not needed any more.
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
    if extra.contains(&"--redis") {
        let deadline = Instant::now() + Duration::from_secs(10);
        while HttpConn::connect(server.addr())
            .get("/healthz", RECV_TIMEOUT)
            .status
            != 200
        {
            assert!(Instant::now() < deadline, "redis link not up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    server
}

fn publish_http(addr: SocketAddr, body: &str) -> support_http::Response {
    HttpConn::connect(addr).publish(Some(API_KEY), body)
}

/// Subscribes without `since`; returns the messages that came before `subscribed`, and
/// `subscribed` itself.
async fn subscribe_fresh(ws: &mut Ws, channel: &str) -> (Vec<Value>, Value) {
    send_json(ws, &json!({"type":"subscribe","channel":channel,"id":1})).await;
    let mut before = Vec::new();
    loop {
        let reply = recv_json(ws).await;
        match reply["type"].as_str() {
            Some("message") => before.push(reply),
            Some("subscribed") => return (before, reply),
            _ => panic!("unexpected {reply}"),
        }
    }
}

/// The latest message of a `latest` channel reaches a new subscriber on every transport,
/// long after the history TTL; a channel of another namespace starts live.
async fn latest_reaches_every_transport_after_the_ttl(server: &Server) {
    let addr = server.addr();
    for (channel, value) in [("state.a", 1), ("state.a", 2), ("plain", 1)] {
        let body = json!({"channel":channel,"data":{"v":value}}).to_string();
        let r = blocking(move || publish_http(addr, &body)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Four TTLs: a stream channel's history is gone by then, and its sweep has run.
    tokio::time::sleep(Duration::from_millis(4 * TTL_MS.parse::<u64>().unwrap())).await;

    let mut ws = connect_ws(addr).await;
    let (before, subscribed) = subscribe_fresh(&mut ws, "state.a").await;
    assert_eq!(subscribed["seq"], 2, "{subscribed}");
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["seq"], 2);
    assert_eq!(before[0]["data"], json!({"v":2}));
    let (before, subscribed) = subscribe_fresh(&mut ws, "plain").await;
    assert!(
        before.is_empty(),
        "a stream channel starts live: {before:?}"
    );
    assert_eq!(subscribed["seq"], 1);

    let (sse, poll, plain_poll) = blocking(move || {
        let mut sse = HttpConn::connect(addr);
        sse.send_get("/sse?channel=state.a", "");
        let sse = sse.read_stream_until("\"v\":2", 1, RECV_TIMEOUT);
        let poll = HttpConn::connect(addr).get("/poll?channel=state.a&timeout=5", RECV_TIMEOUT);
        let plain = HttpConn::connect(addr).get("/poll?channel=plain&timeout=1", RECV_TIMEOUT);
        (sse, poll, plain)
    })
    .await;
    assert!(sse.contains("id: 2\n") || sse.contains("id:2\n"), "{sse}");
    assert_eq!(poll.status, 200, "{}", poll.text());
    let messages = &poll.json()["messages"];
    assert_eq!(
        messages.as_array().map(Vec::len),
        Some(1),
        "{}",
        poll.text()
    );
    assert_eq!(messages[0]["data"], json!({"v":2}), "{}", poll.text());
    assert_eq!(
        plain_poll.json()["messages"],
        json!([]),
        "{}",
        plain_poll.text()
    );

    // Live messages follow the latest one, once each.
    let r = blocking(move || publish_http(addr, r#"{"channel":"state.a","data":{"v":3}}"#)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (seq, data, _) = recv_message(&mut ws, "state.a").await;
    assert_eq!((seq, data), (3, json!({"v":3})));
}

#[tokio::test]
async fn latest_recovery_outlives_the_history_ttl_on_one_node() {
    let server = node("one", &[]);
    latest_reaches_every_transport_after_the_ttl(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_recovery_outlives_the_history_ttl_with_redis() {
    let redis = Redis::start(&require_redis());
    let url = redis.url();
    let server = node("redis", &["--redis", &url]);
    latest_reaches_every_transport_after_the_ttl(&server).await;
    // The stream of the latest channel has no expiry; the stream channel's expired.
    let ttl = redis.command(&["PTTL", "herald:{state.a}:stream"]);
    assert!(ttl.starts_with(":-1"), "{ttl}");
    let plain = redis.command(&["EXISTS", "herald:{plain}:stream"]);
    assert!(plain.starts_with(":0"), "{plain}");
}

/// One read-modify-write client: reads the counter (latest on subscribe), then adds 1
/// `times` times with `expect_seq`, rereading on `conflict`. Returns the conflicts it was
/// told, each checked to carry a seq at least the one it expected.
async fn increment(addr: SocketAddr, channel: &str, times: u64) -> u64 {
    let mut ws = connect_ws(addr).await;
    let (before, subscribed) = subscribe_fresh(&mut ws, channel).await;
    let mut seq = subscribed["seq"].as_u64().unwrap();
    let mut value = before.last().map_or(0, |m| m["data"].as_u64().unwrap());
    let (mut done, mut conflicts, mut id) = (0, 0, 10);
    while done < times {
        id += 1;
        let expected = seq;
        let publish =
            json!({"type":"publish","channel":channel,"data":value + 1,"expect_seq":seq,"id":id});
        send_json(&mut ws, &publish).await;
        // Messages of the channel (ours and others') arrive in seq order before and
        // after the answer: each one is the counter's newest value.
        loop {
            let reply = recv_json(&mut ws).await;
            match reply["type"].as_str() {
                Some("message") => {
                    let at = reply["seq"].as_u64().unwrap();
                    if at > seq {
                        seq = at;
                        value = reply["data"].as_u64().unwrap();
                    }
                }
                Some("ack") if reply["id"] == id => {
                    done += 1;
                    break;
                }
                Some("error") if reply["id"] == id => {
                    assert_eq!(reply["code"], "conflict", "{reply}");
                    let current = reply["seq"].as_u64().expect("conflict names the seq");
                    assert!(current > expected, "{reply} expected {expected}");
                    conflicts += 1;
                    // Wait for the messages up to the current seq before retrying.
                    while seq < current {
                        let (at, data, _) = recv_message(&mut ws, channel).await;
                        if at > seq {
                            seq = at;
                            value = data.as_u64().unwrap();
                        }
                    }
                    break;
                }
                _ => panic!("unexpected {reply}"),
            }
        }
    }
    conflicts
}

/// `clients` incrementers on the nodes at `addrs` (round robin), `times` each: the
/// counter ends at exactly `clients * times`, its seq too (no refused publish was
/// stored), and some of them were told `conflict`.
async fn no_update_is_lost(addrs: &[SocketAddr], clients: usize, times: u64) {
    let channel = "state.counter";
    let tasks: Vec<_> = (0..clients)
        .map(|i| tokio::spawn(increment(addrs[i % addrs.len()], channel, times)))
        .collect();
    let mut conflicts = 0;
    for task in tasks {
        conflicts += tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("incrementers finish")
            .unwrap();
    }
    let total = clients as u64 * times;
    for &addr in addrs {
        let mut ws = connect_ws(addr).await;
        let (before, subscribed) = subscribe_fresh(&mut ws, channel).await;
        assert_eq!(subscribed["seq"], total, "{subscribed}");
        assert_eq!(before[0]["data"], total, "{before:?}");
    }
    assert!(conflicts > 0, "{clients} concurrent clients never collided");
    println!("{clients} clients x {times}: {conflicts} conflicts, counter {total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_seq_loses_no_update_under_concurrent_publishers_on_one_node() {
    let server = node("concurrent", &[]);
    no_update_is_lost(&[server.addr()], 4, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_seq_loses_no_update_across_two_cluster_nodes() {
    let redis = Redis::start(&require_redis());
    let url = redis.url();
    let a = node("cluster-a", &["--redis", &url]);
    let b = node("cluster-b", &["--redis", &url]);
    no_update_is_lost(&[a.addr(), b.addr()], 4, 60).await;
}

/// `POST /api/publish` with `expect_seq`: 200 on the expected seq, else 409 `conflict`
/// with the current seq, the connection kept; a batch may not carry it.
async fn http_expect_seq(addr: SocketAddr) {
    let (first, stale, next, batch) = blocking(move || {
        let mut conn = HttpConn::connect(addr);
        let first = conn.publish(
            Some(API_KEY),
            r#"{"channel":"state.h","data":1,"expect_seq":0}"#,
        );
        let stale = conn.publish(
            Some(API_KEY),
            r#"{"channel":"state.h","data":2,"expect_seq":0}"#,
        );
        // The same connection carries the next request after a 409.
        let next = conn.publish(
            Some(API_KEY),
            r#"{"channel":"state.h","data":2,"expect_seq":1}"#,
        );
        let batch = publish_http(
            addr,
            r#"{"messages":[{"channel":"state.h","data":3,"expect_seq":2}]}"#,
        );
        (first, stale, next, batch)
    })
    .await;
    assert_eq!((first.status, first.json()["seq"].as_u64()), (200, Some(1)));
    stale.assert_api_error(409, "conflict");
    assert_eq!(stale.json()["seq"], 1, "{}", stale.text());
    assert_eq!(stale.json()["channel"], "state.h", "{}", stale.text());
    assert_eq!((next.status, next.json()["seq"].as_u64()), (200, Some(2)));
    batch.assert_api_error(400, "bad_request");
}

#[tokio::test]
async fn http_publish_with_expect_seq_answers_409_with_the_current_seq() {
    let server = node("http", &[]);
    http_expect_seq(server.addr()).await;
    let refused = metric_value(
        server.addr(),
        "herald_rejected_requests_total{status=\"409\"}",
    );
    assert_eq!(refused, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_with_expect_seq_is_checked_in_redis() {
    let redis = Redis::start(&require_redis());
    let url = redis.url();
    let server = node("http-redis", &["--redis", &url]);
    http_expect_seq(server.addr()).await;
}
