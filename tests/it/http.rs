//! The HTTP side of the one port (issue 5; reliability.md group P): `POST /api/publish`,
//! long-poll `/poll`, Server-Sent Events `/sse`, `/metrics` (checked by a strict
//! Prometheus text 0.0.4 parser below), `/api/stats` and `/healthz`. Real binary, two
//! shards; every wait is bounded.

use crate::support;
use crate::support_http;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use support_http::{HttpConn, Response};

const KEY: &str = "s3cret-key";
const T5: Duration = Duration::from_secs(5);

fn start_with_key(extra: &[&str]) -> Server {
    let mut args = vec!["--threads", "2", "--api-key", KEY];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// One publish on a fresh connection.
fn publish_once(addr: SocketAddr, body: &str) -> Response {
    HttpConn::connect(addr).publish(Some(KEY), body)
}

/// The latest seq of `channel`, as a fresh subscriber learns it.
/// The channel's latest seq, read by subscribing; the subscription is released (and its
/// `unsubscribed` seen) before this returns, so it is not counted by a later publish.
async fn latest_seq(addr: SocketAddr, channel: &str) -> u64 {
    let mut ws = connect_ws(addr).await;
    let seq = subscribe(&mut ws, channel, 1).await["seq"]
        .as_u64()
        .unwrap();
    send_json(
        &mut ws,
        &json!({"type":"unsubscribe","channel":channel,"id":2}),
    )
    .await;
    let reply = recv_json(&mut ws).await;
    assert_eq!(reply["type"], "unsubscribed", "{reply}");
    seq
}

fn assert_keep_alive(r: &Response) {
    assert_eq!(
        r.header("Connection"),
        Some("keep-alive"),
        "HTTP/1.1 request without `Connection: close` must be kept alive: {r:?}"
    );
}

// ---------------------------------------------------------------------------------------
// POST /api/publish
// ---------------------------------------------------------------------------------------

#[test]
fn publish_without_a_configured_api_key_is_403_publish_disabled() {
    let mut server = Server::start(&["--threads", "2"]);
    let r =
        HttpConn::connect(server.addr()).publish(Some("anything"), r#"{"channel":"a","data":1}"#);
    r.assert_api_error(403, "publish_disabled");
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_needs_the_api_key_as_bearer_token() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    let body = r#"{"channel":"guarded","data":1}"#;
    let cases: Vec<(&str, String)> = vec![
        ("no Authorization", String::new()),
        ("wrong key", "Authorization: Bearer not-the-key\r\n".into()),
        ("key as Basic", format!("Authorization: Basic {KEY}\r\n")),
        ("key without scheme", format!("Authorization: {KEY}\r\n")),
        ("key prefix", "Authorization: Bearer s3cret\r\n".into()),
    ];
    for (what, auth) in cases {
        let r = blocking(move || {
            let mut c = HttpConn::connect(addr);
            let req = format!(
                "POST /api/publish HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            c.send_raw(req.as_bytes());
            c.read_response(T5)
        })
        .await;
        r.assert_api_error(401, "unauthorized");
        assert_eq!(
            r.header("WWW-Authenticate"),
            Some("Bearer"),
            "{what}: 401 needs `WWW-Authenticate: Bearer`: {r:?}"
        );
    }
    assert_eq!(
        latest_seq(addr, "guarded").await,
        0,
        "a refused publish must not be stored"
    );
    let r = blocking(move || publish_once(addr, body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // (`subscribers` may still count the probe above until its close reaches the home.)
    assert_eq!(r.json()["seq"], 1, "{}", r.text());
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_receipt_counts_subscribers_and_every_subscriber_gets_the_bytes() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    // Eight subscribers: both shards in practice.
    let mut subs = Vec::new();
    for i in 0..8 {
        let mut ws = connect_ws(addr).await;
        subscribe(&mut ws, "receipt", i).await;
        subs.push(ws);
    }
    let body = "{\"channel\":\"receipt\", \"data\" : {\"a\" : [1, 2.50], \"s\":\"\\u00e9\"}}";
    let r = blocking(move || publish_once(addr, body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(r.json(), json!({"seq":1,"subscribers":8}), "receipt");
    for ws in &mut subs {
        let (seq, _, raw) = recv_message(ws, "receipt").await;
        assert_eq!(seq, 1);
        assert!(
            raw.ends_with(r#""data":{"a" : [1, 2.50], "s":"\u00e9"}}"#),
            "data must be the publisher's bytes unchanged: {raw}"
        );
    }
    // Two leave; the count follows (the home learns it a loop turn later).
    for _ in 0..2 {
        let mut ws = subs.pop().unwrap();
        send_json(
            &mut ws,
            &json!({"type":"unsubscribe","channel":"receipt","id":9}),
        )
        .await;
        assert_eq!(recv_json(&mut ws).await["type"], "unsubscribed");
    }
    let deadline = Instant::now() + T5;
    let mut seq = 1;
    loop {
        let r = blocking(move || publish_once(addr, r#"{"channel":"receipt","data":0}"#)).await;
        seq += 1;
        assert_eq!(r.json()["seq"], seq);
        if r.json()["subscribers"] == 6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "receipt never counted 6 subscribers: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_publish_returns_one_result_per_message_in_order() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    let mut a = connect_ws(addr).await;
    subscribe(&mut a, "batch-a", 1).await;
    let body = r#"{"messages":[{"channel":"batch-a","data":"one"},{"channel":"batch-b","data":[2]},{"data":{"n":3},"channel":"batch-a"}]}"#;
    let r = blocking(move || publish_once(addr, body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"results":[{"seq":1,"subscribers":1},{"seq":1,"subscribers":0},{"seq":2,"subscribers":1}]})
    );
    assert_eq!(recv_message(&mut a, "batch-a").await.1, json!("one"));
    assert_eq!(recv_message(&mut a, "batch-a").await.1, json!({"n":3}));
    assert_eq!(latest_seq(addr, "batch-b").await, 1);
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_publishes_are_400_json_and_keep_the_connection() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    let cases: &[(&str, &str)] = &[
        ("{", "bad_request"),
        ("", "bad_request"),
        ("[1,2]", "bad_request"),
        (r#"{"channel":"p-bad"}"#, "bad_request"),
        (r#"{"data":1}"#, "bad_request"),
        (r#"{"channel":"p-bad","data":}"#, "bad_request"),
        (r#"{"channel":"","data":1}"#, "bad_channel"),
        (r#"{"channel":"a b","data":1}"#, "bad_channel"),
        (r#"{"channel":7,"data":1}"#, "bad_request"),
        (r#"{"messages":[]}"#, "bad_request"),
        (r#"{"messages":{}}"#, "bad_request"),
        // One bad message refuses the whole batch: nothing of it is published.
        (
            r#"{"messages":[{"channel":"p-bad","data":1},{"channel":"x y","data":2}]}"#,
            "bad_channel",
        ),
        (
            r#"{"messages":[{"channel":"p-bad","data":1},{"channel":"p-bad"}]}"#,
            "bad_request",
        ),
    ];
    let responses = blocking(move || {
        let mut conn = HttpConn::connect(addr);
        let mut out = Vec::new();
        for (body, _) in cases {
            out.push(conn.publish(Some(KEY), body));
        }
        // The same connection still publishes.
        out.push(conn.publish(Some(KEY), r#"{"channel":"p-ok","data":true}"#));
        out
    })
    .await;
    for ((body, code), r) in cases.iter().zip(&responses) {
        assert_eq!(r.status, 400, "body {body:?}: {r:?}");
        r.assert_api_error(400, code);
        assert_keep_alive(r);
    }
    let last = responses.last().unwrap();
    assert_eq!(last.status, 200, "{last:?}");
    assert_eq!(last.json()["seq"], 1);
    assert_eq!(
        latest_seq(addr, "p-bad").await,
        0,
        "a refused body must publish nothing"
    );
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_max_body_bytes_is_413_and_nothing_is_published() {
    let mut server = start_with_key(&["--max-body-bytes", "100"]);
    let addr = server.addr();
    let fill = |len: usize| {
        let head = r#"{"channel":"big","data":""#;
        let pad = len - head.len() - 2;
        format!("{head}{}\"}}", "x".repeat(pad))
    };
    let (at_limit, over) = (fill(100), fill(101));
    assert_eq!((at_limit.len(), over.len()), (100, 101));
    let r = blocking(move || publish_once(addr, &at_limit)).await;
    assert_eq!(
        r.status, 200,
        "a body of exactly --max-body-bytes is fine: {r:?}"
    );
    let r = blocking(move || {
        let mut conn = HttpConn::connect(addr);
        let r = conn.publish(Some(KEY), &over);
        // The server may close after a refusal it did not read to the end.
        let closed = r.header("Connection") == Some("close") && conn.closed_within(T5);
        (r, closed)
    })
    .await;
    r.0.assert_api_error(413, "too_large");
    assert!(r.1, "413 says `Connection: close` and closes: {:?}", r.0);
    // A huge declared length is refused from the head alone (no body sent).
    let r = blocking(move || {
        let mut conn = HttpConn::connect(addr);
        conn.send_raw(
            format!("POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 10000000000\r\n\r\n")
                .as_bytes(),
        );
        conn.read_response(T5)
    })
    .await;
    r.assert_api_error(413, "too_large");
    assert_eq!(
        latest_seq(addr, "big").await,
        1,
        "only the body at the limit was published"
    );
    server.assert_healthy();
}

#[test]
fn chunked_publish_is_411_and_wrong_method_and_path_are_json_errors() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    let mut conn = HttpConn::connect(addr);
    conn.send_raw(
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n\
             18\r\n{{\"channel\":\"c\",\"data\":1}}\r\n0\r\n\r\n"
        )
        .as_bytes(),
    );
    conn.read_response(T5)
        .assert_api_error(411, "length_required");

    let r = HttpConn::connect(addr).get("/api/publish", T5);
    r.assert_api_error(405, "method_not_allowed");
    assert_eq!(r.header("Allow"), Some("POST"), "{r:?}");
    let r = HttpConn::connect(addr).get("/no/such/path", T5);
    r.assert_api_error(404, "not_found");
    let mut c = HttpConn::connect(addr);
    c.send_raw(b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.read_response(T5);
    r.assert_api_error(405, "method_not_allowed");
    assert_eq!(r.header("Allow"), Some("GET, HEAD"), "{r:?}");
    server.assert_healthy();
}

#[test]
fn publishes_keep_the_connection_alive_across_requests() {
    let mut server = start_with_key(&[]);
    let mut conn = HttpConn::connect(server.addr());
    for expect in 1..=3 {
        let r = conn.publish(Some(KEY), r#"{"channel":"ka","data":"x"}"#);
        assert_eq!(r.status, 200, "{r:?}");
        assert_keep_alive(&r);
        assert_eq!(
            r.json()["seq"],
            expect,
            "request {expect} on one connection"
        );
    }
    // Other endpoints on the same connection.
    let r = conn.get("/healthz", T5);
    assert_eq!((r.status, r.json()), (200, json!({"status":"ok"})));
    let r = conn.get("/metrics", T5);
    assert_eq!(r.status, 200);
    // `Connection: close` is honoured.
    conn.send_raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let r = conn.read_response(T5);
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(
        conn.closed_within(T5),
        "server keeps the connection after `Connection: close`"
    );
    server.assert_healthy();
}

/// RFC 9112 §9.3.2: a client may send its next request before the previous response.
#[test]
fn pipelined_request_after_a_publish_is_answered() {
    let mut server = start_with_key(&[]);
    let mut conn = HttpConn::connect(server.addr());
    let body = r#"{"channel":"pipe","data":1}"#;
    let one = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.send_raw(format!("{one}{one}").as_bytes());
    let first = conn.read_response(T5);
    assert_eq!(first.json()["seq"], 1);
    let second = conn.try_read_response(Duration::from_secs(3));
    assert!(
        second.is_some(),
        "the second of two pipelined publishes got no response within 3 s \
         (it stays in the read buffer after the first, asynchronous, answer)"
    );
    assert_eq!(second.unwrap().json()["seq"], 2);
    server.assert_healthy();
}

#[test]
fn pipelined_request_after_a_long_poll_is_answered() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    publish_once(addr, r#"{"channel":"pipe-poll","data":1}"#);
    let mut conn = HttpConn::connect(addr);
    conn.send_raw(
        b"GET /poll?channel=pipe-poll&since=0&timeout=5 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let first = conn.read_response(T5);
    assert_eq!(first.json()["seq"], 1, "{first:?}");
    let second = conn.try_read_response(Duration::from_secs(3));
    assert!(
        second.is_some(),
        "a GET pipelined behind a long-poll got no response within 3 s"
    );
    assert_eq!(second.unwrap().status, 200);
    server.assert_healthy();
}

// ---------------------------------------------------------------------------------------
// GET /poll
// ---------------------------------------------------------------------------------------

fn poll(conn: &mut HttpConn, query: &str, limit: Duration) -> (Value, Duration) {
    let started = Instant::now();
    let r = conn.get(&format!("/poll?{query}"), limit);
    let took = started.elapsed();
    assert_eq!(r.status, 200, "poll {query}: {r:?}");
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_keep_alive(&r);
    (r.json(), took)
}

/// Waits (up to 10 s) until the server holds `count` parked polls.
async fn wait_polls(addr: SocketAddr, count: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while blocking(move || metric_value(addr, r#"herald_connections{transport="poll"}"#)).await
        != Some(count)
    {
        assert!(Instant::now() < deadline, "never {count} parked polls");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn seqs(v: &Value) -> Vec<u64> {
    v["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages list: {v}"))
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_answers_at_once_from_history() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    for i in 1..=3 {
        publish_once(
            addr,
            &format!(r#"{{"channel":"lp-hist","data":{{"i":{i}}}}}"#),
        );
    }
    let mut ws = connect_ws(addr).await;
    let epoch = subscribe(&mut ws, "lp-hist", 1).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    // Answered within T5 although the poll may wait 30 s: from history, at once.
    let (v, _) = blocking(move || {
        poll(
            &mut HttpConn::connect(addr),
            "channel=lp-hist&since=1&timeout=30",
            T5,
        )
    })
    .await;
    assert_eq!(v["channel"], "lp-hist");
    assert_eq!(v["epoch"], epoch.as_str());
    assert_eq!(v["seq"], 3, "seq is the next since: {v}");
    assert_eq!(
        v["messages"],
        json!([
            {"type":"message","channel":"lp-hist","seq":2,"data":{"i":2}},
            {"type":"message","channel":"lp-hist","seq":3,"data":{"i":3}}
        ])
    );
    assert!(v.get("history_gap").is_none(), "{v}");
    // With the epoch, and with since=0: everything.
    let q = format!("channel=lp-hist&since=0&timeout=30&epoch={epoch}");
    let (v, _) = blocking(move || poll(&mut HttpConn::connect(addr), &q, T5)).await;
    assert_eq!(seqs(&v), [1, 2, 3]);
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_poll_returns_with_the_next_message() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    // The latest seq as the publishes answer it: a subscription to read it would be
    // counted by the next publish until its release reached the channel's home.
    let mut seq = publish_once(addr, r#"{"channel":"lp-wait","data":"old"}"#).json()["seq"]
        .as_u64()
        .unwrap();
    // Caught up (since = latest) and without since: both park.
    for query in [
        "channel=lp-wait&since=SEQ&timeout=20",
        "channel=lp-wait&timeout=20",
    ] {
        wait_polls(addr, 0.0).await;
        let query = query.replace("SEQ", &seq.to_string());
        let poller = tokio::task::spawn_blocking(move || {
            poll(
                &mut HttpConn::connect(addr),
                &query,
                Duration::from_secs(10),
            )
        });
        wait_polls(addr, 1.0).await;
        assert!(!poller.is_finished(), "a caught-up poll must wait");
        let r =
            blocking(move || publish_once(addr, r#"{"channel":"lp-wait","data":{"new":true}}"#))
                .await;
        let published = r.json()["seq"].as_u64().unwrap();
        assert_eq!(
            r.json()["subscribers"],
            1,
            "the parked poll counts as a subscriber: {}",
            r.text()
        );
        // What it answers with is the message published after it parked.
        let (v, _) = tokio::time::timeout(T5, poller)
            .await
            .expect("poll answered")
            .unwrap();
        assert_eq!(
            v["messages"],
            json!([{"type":"message","channel":"lp-wait","seq":published,"data":{"new":true}}])
        );
        assert_eq!(v["seq"], published);
        seq = published;
    }
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_times_out_with_an_empty_list_and_keeps_the_connection() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    publish_once(addr, r#"{"channel":"lp-idle","data":1}"#);
    let (first, second, third) = blocking(move || {
        let mut conn = HttpConn::connect(addr);
        let first = poll(&mut conn, "channel=lp-idle&since=1&timeout=1", T5);
        // Second request on the same connection: answered from history.
        let second = poll(&mut conn, "channel=lp-idle&since=0&timeout=5", T5);
        // Third: caught up, no wait asked for.
        let third = poll(&mut conn, "channel=lp-idle&since=1&timeout=0", T5);
        (first, second, third)
    })
    .await;
    // Each answer came within T5; the first only once its timeout had passed.
    let (v, took) = first;
    assert!(
        took >= Duration::from_millis(900),
        "timeout=1 answered before its second was over: {took:?}"
    );
    assert_eq!(v["messages"], json!([]), "{v}");
    assert_eq!(v["seq"], 1, "{v}");
    assert!(v.get("history_gap").is_none(), "{v}");
    let (v, _) = second;
    assert_eq!(seqs(&v), [1]);
    let (v, _) = third;
    assert_eq!(v["messages"], json!([]));
    server.assert_healthy();
}

/// `timeout=0` is plain polling: what history holds after `since` must still come back.
#[test]
fn poll_with_timeout_zero_still_answers_from_history() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    // Channels homed on either shard, so some polls land away from their channel's home.
    let channels: Vec<String> = (0..6).map(|i| format!("lp-zero-{i}")).collect();
    for c in &channels {
        publish_once(addr, &format!(r#"{{"channel":"{c}","data":"kept"}}"#));
    }
    let mut empty = Vec::new();
    for round in 0..5 {
        for c in &channels {
            let (v, _) = poll(
                &mut HttpConn::connect(addr),
                &format!("channel={c}&since=0&timeout=0"),
                T5,
            );
            if seqs(&v) != [1] {
                empty.push(format!("round {round}: {v}"));
            }
        }
    }
    assert!(
        empty.is_empty(),
        "{} of 30 polls `since=0&timeout=0` on a channel whose history holds seq 1 got no messages:\n{}",
        empty.len(),
        empty.join("\n")
    );
    server.assert_healthy();
}

/// A poll that ended before its channel's home answered must not take the next poll's
/// place on the same keep-alive connection: the next poll's own `since` decides.
#[test]
fn a_poll_after_a_timed_out_poll_on_the_same_connection_gets_its_own_answer() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    let channels: Vec<String> = (0..6).map(|i| format!("lp-stale-{i}")).collect();
    for c in &channels {
        publish_once(addr, &format!(r#"{{"channel":"{c}","data":"missed?"}}"#));
    }
    let mut wrong = Vec::new();
    for round in 0..5 {
        for c in &channels {
            let mut conn = HttpConn::connect(addr);
            // Caught up, no wait: ends at once (often before its home's reply).
            poll(&mut conn, &format!("channel={c}&since=1&timeout=0"), T5);
            // Then ask for everything: seq 1 is in history.
            let (v, took) = poll(&mut conn, &format!("channel={c}&since=0&timeout=1"), T5);
            if seqs(&v) != [1] {
                wrong.push(format!("round {round}: since=0 after {took:?}: {v}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of 30 second polls lost seq 1 (answered with \"seq\":1 and no messages, so the client \
         moves past a message it never got):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_timeouts_are_capped_not_refused_and_bad_queries_are_400() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    for timeout in ["100000", "18446744073709551615"] {
        wait_polls(addr, 0.0).await;
        let q = format!("channel=lp-cap&timeout={timeout}");
        let poller = tokio::task::spawn_blocking(move || {
            poll(&mut HttpConn::connect(addr), &q, Duration::from_secs(10))
        });
        wait_polls(addr, 1.0).await;
        assert!(
            !poller.is_finished(),
            "timeout={timeout} must park, not fail"
        );
        blocking(move || publish_once(addr, r#"{"channel":"lp-cap","data":0}"#)).await;
        let (v, _) = tokio::time::timeout(T5, poller)
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(seqs(&v).len(), 1, "{v}");
    }
    for bad in [
        "/poll",
        "/poll?since=1",
        "/poll?channel=a&since=-1",
        "/poll?channel=a&since=x",
        "/poll?channel=a&timeout=1.5",
        "/poll?channel=a&timeout=99999999999999999999",
        "/poll?channel=a%20b",
    ] {
        let r = blocking(move || HttpConn::connect(addr).get(bad, T5)).await;
        r.assert_api_error(400, "bad_request");
    }
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_beyond_history_or_from_another_epoch_reports_history_gap() {
    let mut server = start_with_key(&["--history-size", "2"]);
    let addr = server.addr();
    for i in 0..5 {
        publish_once(addr, &format!(r#"{{"channel":"lp-gap","data":{i}}}"#));
    }
    // Answered within T5 although the poll may wait 10 s: a gap answers at once.
    let (v, _) = blocking(move || {
        poll(
            &mut HttpConn::connect(addr),
            "channel=lp-gap&since=1&timeout=10",
            T5,
        )
    })
    .await;
    assert_eq!(v["history_gap"], json!({"oldest":4}), "{v}");
    assert_eq!(v["seq"], 5);
    assert_eq!(v["messages"], json!([]));
    // The edge: since=3 needs 4.., which is kept.
    let (v, _) = blocking(move || {
        poll(
            &mut HttpConn::connect(addr),
            "channel=lp-gap&since=3&timeout=10",
            T5,
        )
    })
    .await;
    assert_eq!(seqs(&v), [4, 5], "{v}");
    let (v, _) = blocking(move || {
        poll(
            &mut HttpConn::connect(addr),
            "channel=lp-gap&since=4&timeout=10&epoch=someone-else",
            T5,
        )
    })
    .await;
    assert_eq!(v["history_gap"]["oldest"], 4, "another epoch is a gap: {v}");
    // since ahead of the channel.
    let (v, _) = blocking(move || {
        poll(
            &mut HttpConn::connect(addr),
            "channel=lp-gap&since=50&timeout=10",
            T5,
        )
    })
    .await;
    assert!(
        v.get("history_gap").is_some(),
        "since ahead of latest is a gap: {v}"
    );
    server.assert_healthy();
}

// ---------------------------------------------------------------------------------------
// GET /sse
// ---------------------------------------------------------------------------------------

/// One parsed event: its fields in order (`data` lines joined with `\n`), or a comment.
#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    comment: bool,
}

/// Splits complete events off the front of `text` (per the HTML event-stream format:
/// events end with a blank line); returns them and how many bytes they used.
fn parse_events(text: &str) -> (Vec<SseEvent>, usize) {
    let mut events = Vec::new();
    let mut used = 0;
    while let Some(end) = text[used..].find("\n\n") {
        let block = &text[used..used + end];
        used += end + 2;
        let mut ev = SseEvent {
            id: None,
            event: None,
            data: None,
            comment: false,
        };
        for line in block.split('\n') {
            if line.starts_with(':') {
                ev.comment = true;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
            match field {
                "id" => ev.id = Some(value),
                "event" => ev.event = Some(value),
                "data" => {
                    ev.data = Some(match ev.data.take() {
                        Some(prev) => format!("{prev}\n{value}"),
                        None => value,
                    })
                }
                other => panic!("unknown event-stream field {other:?} in {block:?}"),
            }
        }
        events.push(ev);
    }
    (events, used)
}

/// Opens an event stream; returns the connection positioned after the head.
fn open_sse(addr: SocketAddr, target: &str, extra: &str) -> HttpConn {
    let mut conn = HttpConn::connect(addr);
    conn.send_get(target, extra);
    let (status, headers) = conn.try_read_head(T5).expect("event stream head");
    let h = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(status, 200, "{target}: {headers:?}");
    assert_eq!(h("Content-Type"), Some("text/event-stream"), "{headers:?}");
    assert_eq!(
        h("Content-Length"),
        None,
        "an event stream has no length: {headers:?}"
    );
    conn
}

/// Reads until `n` non-comment events arrived (comments are dropped); later events stay
/// buffered for the next call.
fn next_events(conn: &mut HttpConn, n: usize, limit: Duration) -> Vec<SseEvent> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    loop {
        let text = conn.read_stream_until(
            "\n\n",
            1,
            deadline.saturating_duration_since(Instant::now()),
        );
        let (events, _) = parse_events(&text);
        let mut used = 0;
        for ev in events {
            // Each event's block ends with its own blank line.
            used += text[used..].find("\n\n").unwrap() + 2;
            if !ev.comment {
                got.push(ev);
            }
            if got.len() == n {
                break;
            }
        }
        conn.consume(used);
        if got.len() == n {
            return got;
        }
    }
}

fn message_event(ev: &SseEvent) -> Value {
    assert_eq!(ev.event.as_deref(), Some("message"), "{ev:?}");
    let v: Value = serde_json::from_str(ev.data.as_deref().expect("data")).expect("data is JSON");
    assert_eq!(
        ev.id.as_deref(),
        Some(v["seq"].to_string().as_str()),
        "id is the seq: {ev:?}"
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resumes_from_last_event_id_then_streams_live() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    for i in 1..=4 {
        publish_once(
            addr,
            &format!(r#"{{"channel":"sse-a","data":{{"i":{i}}}}}"#),
        );
    }
    let epoch = {
        let mut ws = connect_ws(addr).await;
        subscribe(&mut ws, "sse-a", 1).await["epoch"].clone()
    };
    for (target, extra) in [
        ("/sse?channel=sse-a", "Last-Event-ID: 2\r\n"),
        ("/sse?channel=sse-a&since=2", ""),
    ] {
        let (mut conn, events) = blocking(move || {
            let mut conn = open_sse(addr, target, extra);
            let first = next_events(&mut conn, 1, T5);
            assert_eq!(first[0].event.as_deref(), Some("subscribed"), "{first:?}");
            let sub: Value = serde_json::from_str(first[0].data.as_deref().unwrap()).unwrap();
            let latest = sub["seq"].as_u64().unwrap();
            let replay = next_events(&mut conn, latest as usize - 2, T5);
            (conn, (sub, replay))
        })
        .await;
        let (sub, replay) = events;
        assert_eq!(sub["channel"], "sse-a");
        assert_eq!(sub["epoch"], epoch);
        let latest = sub["seq"].as_u64().unwrap();
        let replay: Vec<Value> = replay.iter().map(message_event).collect();
        assert_eq!(
            replay[0],
            json!({"type":"message","channel":"sse-a","seq":3,"data":{"i":3}})
        );
        let replayed: Vec<u64> = replay.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            replayed,
            (3..=latest).collect::<Vec<_>>(),
            "Last-Event-ID 2 replays 3..={latest}"
        );
        // Live: the next publish arrives as an event.
        let r = blocking(move || publish_once(addr, r#"{"channel":"sse-a","data":"live"}"#)).await;
        let live_seq = r.json()["seq"].as_u64().unwrap();
        assert_eq!(live_seq, latest + 1);
        let events = blocking(move || next_events(&mut conn, 1, T5)).await;
        let v = message_event(&events[0]);
        assert_eq!(
            v,
            json!({"type":"message","channel":"sse-a","seq":live_seq,"data":"live"})
        );
    }
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_says_gap_when_history_is_gone_and_continues_live() {
    let mut server = start_with_key(&["--history-size", "2"]);
    let addr = server.addr();
    for i in 0..5 {
        publish_once(addr, &format!(r#"{{"channel":"sse-gap","data":{i}}}"#));
    }
    let (mut conn, events) = blocking(move || {
        let mut conn = open_sse(addr, "/sse?channel=sse-gap", "Last-Event-ID: 1\r\n");
        let events = next_events(&mut conn, 2, T5);
        (conn, events)
    })
    .await;
    assert_eq!(events[0].event.as_deref(), Some("gap"), "{events:?}");
    let gap: Value = serde_json::from_str(events[0].data.as_deref().unwrap()).unwrap();
    assert_eq!(
        (gap["seq"].as_u64(), gap["oldest"].as_u64()),
        (Some(5), Some(4)),
        "{gap}"
    );
    assert_eq!(events[1].event.as_deref(), Some("subscribed"), "{events:?}");
    // A message with a line break in its JSON is split over data: lines and joins back.
    let r = blocking(move || publish_once(addr, "{\"channel\":\"sse-gap\",\"data\":{\"a\":\n1}}"))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let events = blocking(move || next_events(&mut conn, 1, T5)).await;
    assert_eq!(events[0].id.as_deref(), Some("6"));
    assert_eq!(
        events[0].data.as_deref(),
        Some("{\"type\":\"message\",\"channel\":\"sse-gap\",\"seq\":6,\"data\":{\"a\":\n1}}")
    );
    server.assert_healthy();
}

#[test]
fn sse_sends_heartbeat_comments_and_refuses_a_bad_last_event_id() {
    let mut server = start_with_key(&["--ping-interval-ms", "200"]);
    let addr = server.addr();
    let mut conn = open_sse(addr, "/sse?channel=sse-hb", "");
    let text = conn.read_stream_until(": ping\n\n", 2, Duration::from_secs(3));
    let (events, _) = parse_events(&text);
    assert_eq!(events[0].event.as_deref(), Some("subscribed"), "{events:?}");
    assert!(events[1..].iter().all(|e| e.comment), "{events:?}");
    let mut c = HttpConn::connect(addr);
    c.send_get("/sse?channel=sse-hb", "Last-Event-ID: abc\r\n");
    c.read_response(T5).assert_api_error(400, "bad_request");
    HttpConn::connect(addr)
        .get("/sse", T5)
        .assert_api_error(400, "bad_request");
    server.assert_healthy();
}

// ---------------------------------------------------------------------------------------
// /metrics, /api/stats, /healthz
// ---------------------------------------------------------------------------------------

/// A sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// A strict parser for the Prometheus text exposition format 0.0.4: every line is a
/// `# HELP`, a `# TYPE` (before that family's samples, once), another comment, or a
/// sample `name{label="value",...} value [timestamp]` whose family has a TYPE; no series
/// twice; histograms cumulative and ending in `+Inf` = `_count`. Returns samples and
/// the TYPE of each family. Panics with the offending line.
fn parse_prometheus(text: &str) -> (Vec<Sample>, HashMap<String, String>) {
    assert!(text.ends_with('\n'), "exposition must end with a line feed");
    let is_name = |s: &str| {
        !s.is_empty()
            && s.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let parse_value = |s: &str, line: &str| -> f64 {
        match s {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            _ => s
                .parse()
                .unwrap_or_else(|_| panic!("bad value {s:?} in {line:?}")),
        }
    };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut sampled: HashSet<String> = HashSet::new();
    let mut series: HashSet<String> = HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match parts.next() {
                Some("HELP") => {
                    let name = parts
                        .next()
                        .unwrap_or_else(|| panic!("HELP without name: {line:?}"));
                    assert!(is_name(name), "bad name in {line:?}");
                    assert!(helps.insert(name.to_owned()), "second HELP for {name}");
                }
                Some("TYPE") => {
                    let name = parts
                        .next()
                        .unwrap_or_else(|| panic!("TYPE without name: {line:?}"));
                    let kind = parts
                        .next()
                        .unwrap_or_else(|| panic!("TYPE without type: {line:?}"));
                    assert!(is_name(name), "bad name in {line:?}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "bad type in {line:?}"
                    );
                    assert!(
                        !sampled.contains(name),
                        "TYPE after samples of {name}: {line:?}"
                    );
                    assert!(
                        types.insert(name.to_owned(), kind.to_owned()).is_none(),
                        "second TYPE for {name}"
                    );
                }
                _ => {}
            }
            continue;
        }
        assert!(!line.starts_with('#'), "comment must be `# ...`: {line:?}");
        // name, optional {labels}, value, optional timestamp.
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let name = &line[..name_end];
        assert!(is_name(name), "bad metric name in {line:?}");
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after) = rest.strip_prefix('{') {
            let mut s = after;
            loop {
                if let Some(r) = s.strip_prefix('}') {
                    s = r;
                    break;
                }
                let eq = s
                    .find('=')
                    .unwrap_or_else(|| panic!("label without = in {line:?}"));
                let label = &s[..eq];
                assert!(
                    is_name(label) && !label.contains(':'),
                    "bad label name {label:?} in {line:?}"
                );
                s = s[eq + 1..]
                    .strip_prefix('"')
                    .unwrap_or_else(|| panic!("unquoted label value in {line:?}"));
                let mut value = String::new();
                let mut chars = s.char_indices();
                let close = loop {
                    match chars.next() {
                        Some((i, '"')) => break i,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c @ ('\\' | '"'))) => value.push(c),
                            other => panic!("bad escape {other:?} in {line:?}"),
                        },
                        Some((_, '\n')) | None => panic!("unterminated label value in {line:?}"),
                        Some((_, c)) => value.push(c),
                    }
                };
                assert!(
                    labels.insert(label.to_owned(), value).is_none(),
                    "label twice in {line:?}"
                );
                s = &s[close + 1..];
                if let Some(r) = s.strip_prefix(',') {
                    s = r;
                }
            }
            rest = s;
        }
        let rest = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no space before value in {line:?}"));
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap(), line);
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .unwrap_or_else(|_| panic!("bad timestamp in {line:?}"));
        }
        assert!(fields.next().is_none(), "trailing text in {line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| {
                types
                    .get(*base)
                    .is_some_and(|t| t == "histogram" || t == "summary")
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample without a TYPE line: {line:?}"
        );
        sampled.insert(family.to_owned());
        assert!(
            series.insert(format!("{name}{labels:?}")),
            "series twice: {line:?}"
        );
        samples.push((name.to_owned(), labels, value));
    }
    for (family, kind) in &types {
        if kind == "counter" {
            for (n, _, v) in samples.iter().filter(|(n, _, _)| n == family) {
                assert!(*v >= 0.0 && v.is_finite(), "counter {n} = {v}");
            }
        }
        if kind == "histogram" {
            let buckets: Vec<(f64, f64)> = samples
                .iter()
                .filter(|(n, _, _)| *n == format!("{family}_bucket"))
                .map(|(_, l, v)| {
                    let le = l
                        .get("le")
                        .unwrap_or_else(|| panic!("{family} bucket without le"));
                    (parse_value(le, le), *v)
                })
                .collect();
            assert!(!buckets.is_empty(), "histogram {family} without buckets");
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{family} buckets not cumulative: {buckets:?}"
            );
            assert_eq!(
                buckets.last().unwrap().0,
                f64::INFINITY,
                "{family} must end with le=\"+Inf\""
            );
            let count = samples
                .iter()
                .find(|(n, _, _)| *n == format!("{family}_count"))
                .expect("_count")
                .2;
            assert_eq!(
                buckets.last().unwrap().1,
                count,
                "{family}: +Inf bucket != _count"
            );
            assert!(
                samples
                    .iter()
                    .any(|(n, _, _)| *n == format!("{family}_sum")),
                "{family}_sum"
            );
        }
    }
    (samples, types)
}

fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name && label.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v))
        })
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"))
        .2
}

fn scrape(addr: SocketAddr) -> (Vec<Sample>, HashMap<String, String>) {
    let r = HttpConn::connect(addr).get("/metrics", T5);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("Content-Type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    parse_prometheus(&r.text())
}

#[test]
fn the_strict_prometheus_parser_rejects_what_it_should() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\\\"\"} 1\n";
    assert_eq!(parse_prometheus(ok).0.len(), 1);
    for bad in [
        "a 1\n",                      // no TYPE
        "# TYPE a gauge\na{k=v} 1\n", // unquoted label
        "# TYPE a gauge\na 1\na 2\n", // series twice
        "# TYPE a gauge\na one\n",    // bad value
        "# TYPE a gauge\na 1",        // no final line feed
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 0\nh_count 1\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_prometheus(bad)).is_err(),
            "accepted {bad:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_counters_move_after_publishing() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    let (before, types) = blocking(move || scrape(addr)).await;
    for (name, kind) in [
        ("herald_connections", "gauge"),
        ("herald_subscriptions", "gauge"),
        ("herald_channels", "gauge"),
        ("herald_messages_in_total", "counter"),
        ("herald_publishes_total", "counter"),
        ("herald_messages_out_total", "counter"),
        ("herald_bytes_out_total", "counter"),
        ("herald_deliveries_total", "counter"),
        ("herald_slow_consumer_closes_total", "counter"),
        ("herald_rejected_requests_total", "counter"),
        ("herald_shard_busy_seconds_total", "counter"),
        ("herald_publish_flush_seconds", "histogram"),
        ("herald_uptime_seconds", "gauge"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    for transport in ["websocket", "sse", "poll", "http"] {
        value(
            &before,
            "herald_connections",
            Some(("transport", transport)),
        );
    }
    for shard in ["0", "1"] {
        value(
            &before,
            "herald_shard_busy_seconds_total",
            Some(("shard", shard)),
        );
    }
    let get = |s: &[Sample], n: &str| value(s, n, None);

    // Two WebSocket subscribers, five HTTP publishes, one refused publish.
    let mut subs = Vec::new();
    for i in 0..2 {
        let mut ws = connect_ws(addr).await;
        subscribe(&mut ws, "metered", i).await;
        subs.push(ws);
    }
    blocking(move || {
        let mut conn = HttpConn::connect(addr);
        for i in 0..5 {
            assert_eq!(
                conn.publish(Some(KEY), &format!(r#"{{"channel":"metered","data":{i}}}"#))
                    .status,
                200
            );
        }
        assert_eq!(HttpConn::connect(addr).publish(None, "{}").status, 401);
    })
    .await;
    for ws in &mut subs {
        for _ in 0..5 {
            recv_message(ws, "metered").await;
        }
    }
    // Figures may lag a loop turn: scrape until they show it.
    let deadline = Instant::now() + T5;
    loop {
        let (after, _) = blocking(move || scrape(addr)).await;
        let moved = [
            get(&after, "herald_publishes_total") >= get(&before, "herald_publishes_total") + 5.0,
            get(&after, "herald_deliveries_total")
                >= get(&before, "herald_deliveries_total") + 10.0,
            get(&after, "herald_messages_out_total")
                >= get(&before, "herald_messages_out_total") + 10.0,
            get(&after, "herald_bytes_out_total") > get(&before, "herald_bytes_out_total"),
            get(&after, "herald_messages_in_total")
                >= get(&before, "herald_messages_in_total") + 2.0,
            get(&after, "herald_subscriptions") >= 2.0,
            get(&after, "herald_channels") >= 1.0,
            value(
                &after,
                "herald_connections",
                Some(("transport", "websocket")),
            ) >= 2.0,
            value(
                &after,
                "herald_rejected_requests_total",
                Some(("status", "401")),
            ) >= value(
                &before,
                "herald_rejected_requests_total",
                Some(("status", "401")),
            ) + 1.0,
            get(&after, "herald_publish_flush_seconds_count")
                >= get(&before, "herald_publish_flush_seconds_count") + 5.0,
            get(&after, "herald_uptime_seconds") > 0.0,
        ];
        if moved.iter().all(|m| *m) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counters did not move as expected ({moved:?}):\n{after:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.assert_healthy();
}

/// `GET /api/openapi.json` is `src/http/openapi.json` byte for byte (one source, compiled
/// in), as JSON; `HEAD` gives its length; other methods get 405 with `Allow`.
#[test]
fn openapi_document_is_served_as_the_file_in_the_repository() {
    let server = Server::start(&[]);
    let file = include_str!("../../src/http/openapi.json");
    let r = HttpConn::connect(server.addr()).get("/api/openapi.json", T5);
    assert_eq!(
        (r.status, r.header("Content-Type")),
        (200, Some("application/json"))
    );
    assert_eq!(r.text(), file);
    assert!(r.json()["paths"]["/api/publish"]["post"].is_object());
    let mut conn = HttpConn::connect(server.addr());
    conn.send_raw(b"HEAD /api/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n");
    let head = conn.read_head_only(T5);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("Content-Length"),
        Some(file.len().to_string().as_str())
    );
    let mut conn = HttpConn::connect(server.addr());
    conn.send_raw(b"DELETE /api/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n");
    let refused = conn.read_response(T5);
    assert_eq!(refused.status, 405);
    assert_eq!(refused.header("Allow"), Some("GET, HEAD"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_stats_is_a_json_snapshot_that_moves() {
    let mut server = start_with_key(&[]);
    let addr = server.addr();
    let stats = move || {
        let r = HttpConn::connect(addr).get("/api/stats", T5);
        assert_eq!(
            (r.status, r.header("Content-Type")),
            (200, Some("application/json"))
        );
        r.json()
    };
    let before = blocking(stats).await;
    for key in [
        "connections",
        "subscriptions",
        "channels",
        "messages_in_total",
        "publishes_total",
        "deliveries_total",
        "messages_out_total",
        "bytes_out_total",
        "slow_consumer_closes_total",
        "uptime_ms",
    ] {
        assert!(
            before[key].is_u64(),
            "{key} missing or not a count: {before}"
        );
    }
    assert_eq!(before["shards"], 2, "{before}");
    for t in ["websocket", "sse", "poll", "http"] {
        assert!(
            before["connections_by_transport"][t].is_u64(),
            "{t}: {before}"
        );
    }
    let mut ws = connect_ws(addr).await;
    subscribe(&mut ws, "stats", 1).await;
    blocking(move || publish_once(addr, r#"{"channel":"stats","data":1}"#)).await;
    recv_message(&mut ws, "stats").await;
    let deadline = Instant::now() + T5;
    loop {
        let after = blocking(stats).await;
        let n = |v: &Value, k: &str| v[k].as_u64().unwrap();
        if n(&after, "publishes_total") > n(&before, "publishes_total")
            && n(&after, "deliveries_total") > n(&before, "deliveries_total")
            && after["connections_by_transport"]["websocket"].as_u64() >= Some(1)
        {
            break;
        }
        assert!(Instant::now() < deadline, "stats did not move: {after}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.assert_healthy();
}

#[test]
fn head_on_healthz_and_metrics_sends_headers_only() {
    let mut server = Server::start(&["--threads", "2"]);
    let mut conn = HttpConn::connect(server.addr());
    conn.send_raw(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let head = conn.read_head_only(T5);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("Content-Length"),
        Some(r#"{"status":"ok"}"#.len().to_string().as_str())
    );
    conn.send_raw(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let head = conn.read_head_only(T5);
    assert_eq!(head.status, 200);
    assert!(head.header("Content-Length").is_some());
    // Had any body followed a HEAD answer, this response would not parse.
    let r = conn.get("/healthz", T5);
    assert_eq!((r.status, r.json()), (200, json!({"status":"ok"})));
    server.assert_healthy();
}
