//! Cluster on Redis (issue 6, reliability.md group M) against a real `redis-server`:
//! several `herald` processes on one Redis deliver every message to every subscriber
//! exactly once in order, clients of a killed node resume on another with `since`, and a
//! Redis restart loses no acknowledged message while publishes during the outage are
//! refused with `unavailable` (HTTP 503), not acknowledged.
//!
//! Each test starts its own `redis-server` on a free port (`tests/run.sh` installs the
//! Debian package); without it every test fails with a message saying so, never skips.

use crate::support;
use crate::support_deflate;
use crate::support_http;
use crate::support_redis;

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use support_http::HttpConn;
use support_redis::{Redis, require_redis};

const API_KEY: &str = "cluster-key";

fn node(redis: &Redis, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--redis", &url, "--api-key", API_KEY];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    // `listening on` comes before the Redis link is up; /healthz says when it is.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = HttpConn::connect(server.addr()).get("/healthz", RECV_TIMEOUT);
        if health.status == 200 {
            assert_eq!(health.json()["redis"], "up");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "redis link not up: {}",
            health.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// What one subscriber received: `(seq, data as JSON text)` in arrival order.
type Received = Vec<(u64, String)>;

/// Reads `message` frames of `channel` until `count` arrived (or `limit` passed),
/// failing on anything else except a late `subscribed`.
async fn collect(ws: &mut Ws, channel: &str, count: usize, limit: Duration) -> Received {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    while got.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(ws, left).await {
            Some(Event::Text(text)) => {
                let v: Value = serde_json::from_str(&text).expect("JSON from the server");
                assert_eq!(v["type"], "message", "unexpected frame {text}");
                assert_eq!(v["channel"], channel);
                got.push((v["seq"].as_u64().expect("seq"), v["data"].to_string()));
            }
            None => break,
            Some(other) => panic!("subscriber got {other:?}"),
        }
    }
    got
}

fn assert_consecutive_from_one(received: &Received, total: u64, who: &str) {
    let seqs: Vec<u64> = received.iter().map(|(s, _)| *s).collect();
    let expected: Vec<u64> = (1..=total).collect();
    assert_eq!(
        seqs, expected,
        "{who}: every message exactly once, in sequence order"
    );
}

/// Publishes `count` messages on `channel` over one WebSocket, one at a time with a
/// pause; returns the acknowledged `(seq, data)`.
async fn publish_series(
    addr: SocketAddr,
    channel: &str,
    tag: &str,
    count: u64,
    pause: Duration,
) -> Vec<(u64, String)> {
    let mut ws = connect_ws(addr).await;
    let mut acked = Vec::new();
    for i in 0..count {
        let data = json!({"from": tag, "i": i}).to_string();
        let seq = publish_raw(&mut ws, channel, &data, i + 1).await;
        acked.push((seq, data));
        tokio::time::sleep(pause).await;
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_deliver_every_message_once_in_order() {
    let binary = require_redis();
    let redis = Redis::start(&binary);
    let nodes: Vec<Server> = (0..3).map(|_| node(&redis, &[])).collect();
    let channel = "room";
    let mut subscribers = Vec::new();
    for (n, server) in nodes.iter().enumerate() {
        for i in 0..4 {
            let mut ws = connect_ws(server.addr()).await;
            let reply = subscribe(&mut ws, channel, 1).await;
            assert_eq!(reply["seq"], 0, "node {n} subscriber {i}: {reply}");
            subscribers.push((format!("node {n} subscriber {i}"), ws));
        }
    }
    let per_node = 50u64;
    let total = per_node * 3;
    let publishers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(n, server)| {
            let addr = server.addr();
            tokio::spawn(async move {
                publish_series(addr, channel, &format!("n{n}"), per_node, Duration::ZERO).await
            })
        })
        .collect();
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|(who, mut ws)| {
            tokio::spawn(async move {
                let got = collect(&mut ws, channel, total as usize, Duration::from_secs(20)).await;
                (who, got)
            })
        })
        .collect();
    let mut acked = Vec::new();
    for publisher in publishers {
        acked.extend(publisher.await.expect("publisher"));
    }
    acked.sort();
    let acked_seqs: Vec<u64> = acked.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        acked_seqs,
        (1..=total).collect::<Vec<_>>(),
        "one seq per publish"
    );
    let mut first: Option<Received> = None;
    for reader in readers {
        let (who, got) = reader.await.expect("reader");
        assert_consecutive_from_one(&got, total, &who);
        assert_eq!(
            got, acked,
            "{who}: each seq carries the data acknowledged with it"
        );
        if let Some(first) = &first {
            assert_eq!(&got, first, "{who}: the same order as everyone else");
        }
        first.get_or_insert(got);
    }
    for mut server in nodes {
        server.assert_healthy();
    }
}

/// One subscriber of node A that, when A dies, resumes on node B with `since`.
async fn resuming_subscriber(
    first: SocketAddr,
    fallback: SocketAddr,
    channel: &'static str,
    total: u64,
    kill_at: Arc<AtomicU64>,
) -> (Received, usize) {
    let mut ws = connect_ws(first).await;
    let reply = subscribe(&mut ws, channel, 1).await;
    let epoch = reply["epoch"].as_str().expect("epoch").to_owned();
    let mut got: Received = Vec::new();
    let mut before_kill = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (got.len() as u64) < total {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(&mut ws, left).await {
            Some(Event::Text(text)) => {
                let v: Value = serde_json::from_str(&text).expect("JSON");
                match v["type"].as_str() {
                    Some("message") => {
                        got.push((v["seq"].as_u64().expect("seq"), v["data"].to_string()));
                        kill_at.fetch_max(got.len() as u64, Ordering::AcqRel);
                    }
                    Some("subscribed") => assert_eq!(v["epoch"], epoch.as_str(), "{v}"),
                    _ => panic!("unexpected frame {text}"),
                }
            }
            Some(Event::Close(_) | Event::Ended(_)) => {
                assert!(before_kill.is_none(), "dropped twice");
                before_kill = Some(got.len());
                ws = connect_ws(fallback).await;
                let since = got.last().map_or(0, |(s, _)| *s);
                send_json(
                    &mut ws,
                    &json!({"type":"subscribe","channel":channel,"since":since,"epoch":epoch,"id":2}),
                )
                .await;
            }
            Some(other) => panic!("subscriber got {other:?}"),
            None => break,
        }
    }
    (
        got,
        before_kill.expect("the node was killed under this subscriber"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_of_a_killed_node_resume_on_another_without_loss() {
    let binary = require_redis();
    let redis = Redis::start(&binary);
    let history = ["--history-size", "1000"];
    let mut doomed = node(&redis, &history);
    let survivor = node(&redis, &history);
    // 400 publishes 3 ms apart: above the default message rate, which is not under test.
    let publisher = node(
        &redis,
        &[
            "--history-size",
            "1000",
            "--max-messages-per-second",
            "100000",
        ],
    );
    let channel = "ticker";
    let total = 400u64;
    let progress = Arc::new(AtomicU64::new(0));
    let subscribers: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(resuming_subscriber(
                doomed.addr(),
                survivor.addr(),
                channel,
                total,
                progress.clone(),
            ))
        })
        .collect();
    // Every subscriber is in place, and the node subscribed in Redis, before the first
    // publish.
    let doomed_addr = doomed.addr();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_value(doomed_addr, "herald_subscriptions") != Some(4.0)
        || redis.nodes_subscribed(channel) != 1
    {
        assert!(
            Instant::now() < deadline,
            "the 4 subscribers never got in place"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let publishing = tokio::spawn(publish_series(
        publisher.addr(),
        channel,
        "p",
        total,
        Duration::from_millis(3),
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    while progress.load(Ordering::Acquire) < total / 4 {
        assert!(Instant::now() < deadline, "no progress before the kill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    doomed.signal("KILL");
    assert!(doomed.wait_exit(Duration::from_secs(5)).is_some());
    let acked = publishing.await.expect("publisher");
    assert_eq!(acked.len() as u64, total);
    for (i, subscriber) in subscribers.into_iter().enumerate() {
        let (got, before_kill) = subscriber.await.expect("subscriber");
        assert!(
            before_kill > 0 && (before_kill as u64) < total,
            "subscriber {i}: killed mid-stream (after {before_kill})"
        );
        assert_consecutive_from_one(&got, total, &format!("subscriber {i}"));
        assert_eq!(got, acked, "subscriber {i}: the acknowledged data");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restart_loses_no_acknowledged_message_and_refuses_meanwhile() {
    let binary = require_redis();
    let mut redis = Redis::start_persistent(&binary, "restart");
    // Refusals come back at once while Redis is down, so the publisher below may send
    // faster than the default 100 messages/s: this test is about the outage, not the
    // per-connection rate limit, which gets out of the way.
    let unlimited = ["--max-messages-per-second", "100000"];
    let mut subscriber_node = node(&redis, &unlimited);
    let mut publisher_node = node(&redis, &unlimited);
    let channel = "orders";
    let mut sub = connect_ws(subscriber_node.addr()).await;
    let reply = subscribe(&mut sub, channel, 1).await;
    let epoch = reply["epoch"].as_str().expect("epoch").to_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let (acks, refusals) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let publishing = {
        let (stop, acks, refusals) = (stop.clone(), acks.clone(), refusals.clone());
        let addr = publisher_node.addr();
        tokio::spawn(async move {
            let mut ws = connect_ws(addr).await;
            let (mut acked, mut refused) = (Vec::new(), Vec::new());
            let mut id = 0u64;
            while !stop.load(Ordering::Acquire) {
                id += 1;
                let data = json!({"i": id}).to_string();
                send_text(
                    &mut ws,
                    &format!(
                        r#"{{"type":"publish","channel":"{channel}","data":{data},"id":{id}}}"#
                    ),
                )
                .await;
                // Exactly two answers are right: an ack with its seq, or `unavailable`
                // (the outage); both name the publish.
                let v = recv_json(&mut ws).await;
                assert_eq!(v["id"], id, "the answer names the publish: {v}");
                match (v["type"].as_str(), v["code"].as_str()) {
                    (Some("ack"), None) => {
                        acked.push((v["seq"].as_u64().expect("ack with a seq"), data));
                        acks.fetch_add(1, Ordering::Release);
                    }
                    (Some("error"), Some("unavailable")) => {
                        refused.push(data);
                        refusals.fetch_add(1, Ordering::Release);
                    }
                    _ => panic!("publish {id} answered with {v}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (acked, refused)
        })
    };
    // Waits (up to 20 s) until `counter` reaches `at_least`.
    async fn reach(counter: &AtomicU64, at_least: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while counter.load(Ordering::Acquire) < at_least {
            assert!(
                Instant::now() < deadline,
                "{what}: {} of {at_least}",
                counter.load(Ordering::Acquire)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    reach(&acks, 20, "acks before the outage").await;
    redis.kill();
    // While Redis is down: the node notices (/healthz 503), HTTP publishes get 503 and
    // the metric says so.
    let publisher_addr = publisher_node.addr();
    let subscriber_addr = subscriber_node.addr();
    let (during, health, metrics) = blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let health = loop {
            let health = HttpConn::connect(subscriber_addr).get("/healthz", RECV_TIMEOUT);
            if health.status != 200 || Instant::now() > deadline {
                break health;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let during = HttpConn::connect(publisher_addr)
            .publish(Some(API_KEY), r#"{"channel":"orders","data":"lost?"}"#);
        let metrics = HttpConn::connect(subscriber_addr).get("/metrics", RECV_TIMEOUT);
        (during, health, metrics.text())
    })
    .await;
    during.assert_api_error(503, "unavailable");
    assert!(during.header("retry-after").is_some());
    assert_eq!(health.status, 503, "{}", health.text());
    assert!(metrics.contains("herald_redis_up 0"), "{metrics}");
    reach(
        &refusals,
        5,
        "WebSocket publishes refused during the outage",
    )
    .await;
    redis.spawn(&binary);
    // The nodes reconnect (backoff ≤ 2 s) and publishing goes on: wait for 50 acks after
    // the restart.
    let acks_before_restart = acks.load(Ordering::Acquire);
    reach(&acks, acks_before_restart + 50, "acks after the restart").await;
    stop.store(true, Ordering::Release);
    let (acked, refused) = publishing.await.expect("publisher");
    assert!(
        !refused.is_empty(),
        "publishes during the outage were refused"
    );
    let last = acked.last().expect("acked publishes").0;

    // Every acknowledged message reaches the subscriber, in order, once; messages
    // published after the restart prove the node resubscribed. A publish Redis stored
    // just before it died may have been refused (its reply was lost with the
    // connection): the subscriber may get it too, never an unknown one.
    let mut got = Vec::new();
    while got.last().is_none_or(|(seq, _)| *seq < last) {
        let more = collect(&mut sub, channel, 1, Duration::from_secs(10)).await;
        assert!(
            !more.is_empty(),
            "missing messages up to {last}; got {got:?}"
        );
        got.extend(more);
    }
    assert_consecutive_from_one(&got, last, "subscriber");
    for (seq, data) in &acked {
        assert_eq!(
            got.get(*seq as usize - 1),
            Some(&(*seq, data.clone())),
            "acknowledged message {seq} reached the subscriber"
        );
    }
    for (seq, data) in &got {
        assert!(
            acked.iter().any(|(s, _)| s == seq) || refused.contains(data),
            "message {seq} {data} was neither acknowledged nor refused"
        );
    }
    expect_silence(&mut sub, Duration::from_millis(300)).await;

    // A client recovering with since on the other node is served from the restarted
    // Redis's history, in the same epoch.
    let mut late = connect_ws(publisher_node.addr()).await;
    send_json(
        &mut late,
        &json!({"type":"subscribe","channel":channel,"since":last - 5,"epoch":epoch,"id":7}),
    )
    .await;
    let replay = collect(&mut late, channel, 5, RECV_TIMEOUT).await;
    assert_eq!(replay, acked[acked.len() - 5..].to_vec());
    let v = recv_json(&mut late).await;
    assert_eq!(
        (v["type"].as_str(), v["seq"].as_u64()),
        (Some("subscribed"), Some(last))
    );

    let metrics =
        blocking(move || HttpConn::connect(subscriber_addr).get("/metrics", RECV_TIMEOUT))
            .await
            .text();
    assert!(metrics.contains("herald_redis_up 1"), "{metrics}");
    assert!(
        !metrics.contains("herald_redis_reconnects_total 0"),
        "{metrics}"
    );
    subscriber_node.assert_healthy();
    publisher_node.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_is_served_on_any_node_and_beyond_history_is_a_gap() {
    let binary = require_redis();
    let redis = Redis::start(&binary);
    let a = node(&redis, &["--history-size", "5"]);
    let b = node(&redis, &["--history-size", "5"]);
    let acked = publish_series(a.addr(), "feed", "a", 8, Duration::ZERO).await;
    let mut ws = connect_ws(a.addr()).await;
    let epoch = subscribe(&mut ws, "feed", 1).await["epoch"].clone();

    // Node B has never held "feed": the replay comes from the Redis stream.
    let mut resumed = connect_ws(b.addr()).await;
    send_json(
        &mut resumed,
        &json!({"type":"subscribe","channel":"feed","since":5,"epoch":epoch,"id":2}),
    )
    .await;
    assert_eq!(
        collect(&mut resumed, "feed", 3, RECV_TIMEOUT).await,
        acked[5..].to_vec()
    );
    let v = recv_json(&mut resumed).await;
    assert_eq!(
        (v["type"].as_str(), v["seq"].as_u64()),
        (Some("subscribed"), Some(8))
    );

    for (since, epoch) in [(1, epoch.clone()), (3, json!("another-epoch")), (20, epoch)] {
        let mut ws = connect_ws(b.addr()).await;
        send_json(
            &mut ws,
            &json!({"type":"subscribe","channel":"feed","since":since,"epoch":epoch,"id":3}),
        )
        .await;
        let v = recv_json(&mut ws).await;
        assert_eq!(v["type"], "error", "since {since} epoch {epoch}: {v}");
        assert_eq!(v["code"], "history_gap", "{v}");
    }
}

/// Publishes `3` on `channel` until it is acknowledged (refusals must be `unavailable`),
/// for at most 10 s, failing with `stuck`; returns the acknowledged seq.
async fn publish_once_redis_serves(ws: &mut Ws, channel: &str, stuck: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    for id in 11.. {
        send_text(
            ws,
            &format!(r#"{{"type":"publish","channel":"{channel}","data":3,"id":{id}}}"#),
        )
        .await;
        let v = recv_json(ws).await;
        if v["type"] == "ack" {
            return v["seq"].as_u64().expect("seq");
        }
        assert_eq!(v["code"], "unavailable", "{v}");
        assert!(Instant::now() < deadline, "{stuck}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!("ids run out before the deadline")
}

/// Publishes `count` messages, retrying each one the cluster refuses as `unavailable`
/// (what a client is told to do); returns the acknowledged `(seq, data)`.
async fn publish_retrying(
    addr: SocketAddr,
    channel: &str,
    count: u64,
) -> (Vec<(u64, String)>, u32) {
    let mut ws = connect_ws(addr).await;
    let (mut acked, mut refused) = (Vec::new(), 0);
    let mut id = 0;
    for i in 0..count {
        let data = json!({"i": i}).to_string();
        loop {
            id += 1;
            send_text(
                &mut ws,
                &format!(r#"{{"type":"publish","channel":"{channel}","data":{data},"id":{id}}}"#),
            )
            .await;
            let v = recv_json(&mut ws).await;
            if v["type"] == "ack" {
                acked.push((v["seq"].as_u64().expect("seq"), data));
                break;
            }
            assert_eq!(v["code"], "unavailable", "{v}");
            refused += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (acked, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pubsub_connection_is_resubscribed_and_last_leaver_unsubscribes() {
    let binary = require_redis();
    let redis = Redis::start(&binary);
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    assert_eq!(redis.nodes_subscribed("m"), 0);
    let mut sub = connect_ws(a.addr()).await;
    subscribe(&mut sub, "m", 1).await;
    let mut second = connect_ws(a.addr()).await;
    subscribe(&mut second, "m", 1).await;
    assert_eq!(redis.nodes_subscribed("m"), 1, "one SUBSCRIBE per node");

    let publishing = tokio::spawn(publish_retrying(b.addr(), "m", 200));
    // Killed mid-stream: once the first messages have arrived.
    let mut got = collect(&mut sub, "m", 20, Duration::from_secs(10)).await;
    let killed = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    // Each node's pub/sub connection (B's holds only the orders between nodes).
    assert!(
        killed.starts_with(":2"),
        "both nodes' pub/sub connections: {killed}"
    );
    let (acked, _) = publishing.await.expect("publisher");
    got.extend(
        collect(
            &mut sub,
            "m",
            acked.len() - got.len(),
            Duration::from_secs(10),
        )
        .await,
    );
    assert_consecutive_from_one(&got, 200, "subscriber");
    assert_eq!(got, acked);
    assert_eq!(
        redis.nodes_subscribed("m"),
        1,
        "resubscribed after the kill"
    );

    // The node leaves the Redis channel when its last local subscriber does.
    drop(sub);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric_value(a.addr(), "herald_subscriptions") != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "node A still counts the closed subscriber"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        redis.nodes_subscribed("m"),
        1,
        "one local subscriber is left"
    );
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.nodes_subscribed("m") != 0 {
        assert!(Instant::now() < deadline, "still subscribed in redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_works_across_nodes_with_the_channel_epoch() {
    let binary = require_redis();
    let redis = Redis::start(&binary);
    let a = node(&redis, &[]);
    let b = node(&redis, &[]);
    let acked = publish_series(a.addr(), "lp", "a", 2, Duration::ZERO).await;
    let mut ws = connect_ws(b.addr()).await;
    let epoch = subscribe(&mut ws, "lp", 1).await["epoch"].clone();

    // Answered at once from the Redis history, on the node that did not publish.
    let b_addr = b.addr();
    let from_history = blocking(move || {
        HttpConn::connect(b_addr).get("/poll?channel=lp&since=1&timeout=5", RECV_TIMEOUT)
    })
    .await
    .json();
    assert_eq!(from_history["epoch"], epoch, "{from_history}");
    assert_eq!(from_history["messages"][0]["seq"], 2, "{from_history}");

    // Parked, then answered by a publish on the other node.
    let parked = tokio::spawn(blocking(move || {
        HttpConn::connect(b_addr).get("/poll?channel=lp&since=2&timeout=5", RECV_TIMEOUT)
    }));
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric_value(b_addr, r#"herald_connections{transport="poll"}"#) != Some(1.0) {
        assert!(Instant::now() < deadline, "the poll never parked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut publisher = connect_ws(a.addr()).await;
    let seq = publish_raw(&mut publisher, "lp", "\"third\"", 9).await;
    let answer = parked.await.expect("poll").json();
    assert_eq!(answer["epoch"], epoch, "{answer}");
    assert_eq!(answer["seq"], seq, "{answer}");
    assert_eq!(answer["messages"][0]["data"], "third", "{answer}");
    assert_eq!(acked.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_refuses_publishes_in_bounded_time_and_recovers() {
    let binary = require_redis();
    let redis = Redis::start(&binary);
    let mut a = node(&redis, &[]);
    let mut sub = connect_ws(a.addr()).await;
    subscribe(&mut sub, "h", 1).await;
    let mut ws = connect_ws(a.addr()).await;
    assert_eq!(publish_raw(&mut ws, "h", "1", 1).await, 1);
    assert_eq!(recv_message(&mut sub, "h").await.0, 1);

    redis.signal("STOP");
    send_text(
        &mut ws,
        r#"{"type":"publish","channel":"h","data":2,"id":2}"#,
    )
    .await;
    let started = Instant::now();
    // The event loop is not blocked on Redis: a ping is answered while the publish still
    // waits for its reply.
    ping_pong(&mut sub).await;
    assert!(
        next_event(&mut ws, Duration::ZERO).await.is_none(),
        "the publish was answered before the ping: nothing showed the loop free meanwhile"
    );
    let text = recv_text_within(&mut ws, Duration::from_secs(10)).await;
    let v: Value = serde_json::from_str(&text).expect("JSON from the server");
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{v}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused by the 2 s reply timeout, not left waiting for Redis"
    );
    redis.signal("CONT");

    // Recovers by itself: publishing works again within a few seconds, and the
    // subscriber receives what is acknowledged after the hang.
    let seq = publish_once_redis_serves(&mut ws, "h", "no recovery after CONT").await;
    let mut last = 0;
    while last < seq {
        let (got, data, _) = recv_message(&mut sub, "h").await;
        assert!(got > last, "in order, once");
        last = got;
        if got == seq {
            assert_eq!(data, 3);
        }
    }
    a.assert_healthy();
}

/// With `--compression shared` a node compresses each message from Redis once: every
/// compressing subscriber on it gets the same deflated bytes, the others the plain frame.
#[test]
fn a_node_compresses_messages_from_redis_once_for_its_subscribers() {
    use support_deflate::Client;
    let binary = require_redis();
    let redis = Redis::start(&binary);
    let publishing = node(&redis, &["--compression", "shared"]);
    let receiving = node(&redis, &["--compression", "shared"]);
    let mut compressing: Vec<Client> = (0..2)
        .map(|_| Client::connect(receiving.addr(), "/ws", Some("permessage-deflate")))
        .collect();
    let mut plain = Client::connect(receiving.addr(), "/ws", None);
    for client in compressing.iter_mut().chain([&mut plain]) {
        client.subscribe("quotes");
    }
    let data = json!({"quotes": vec!["bid 100.25 ask 100.50"; 40]}).to_string();
    let mut publisher = Client::connect(publishing.addr(), "/ws", None);
    publisher.send_text(&format!(
        r#"{{"type":"publish","channel":"quotes","data":{data},"id":7}}"#
    ));
    let (ack, _) = publisher.recv_message();
    assert!(ack.contains(r#""type":"ack""#), "{ack}");

    let (text, first) = compressing[0].recv_message();
    assert!(
        first.compressed(),
        "a shared channel's message goes out deflated"
    );
    assert!(text.ends_with(&format!(r#""data":{data}}}"#)), "{text}");
    let (other_text, other) = compressing[1].recv_message();
    assert_eq!(other_text, text);
    assert_eq!(
        other.bytes, first.bytes,
        "one deflated frame for every subscriber"
    );
    let (plain_text, plain_frame) = plain.recv_message();
    assert!(!plain_frame.compressed());
    assert_eq!(plain_text, text);
    assert!(plain_frame.bytes.len() > 2 * first.bytes.len());
}

/// The Redis data is lost (here `FLUSHALL`, as after a restart without persistence): the
/// next publish starts a new epoch at seq 1, subscribers are told with a `subscribed`
/// notice carrying the new epoch and seq 0, the metric counts it, and a client resuming
/// with the old epoch gets `history_gap`, never another message under a reused seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_channel_starts_a_new_epoch_announced_to_subscribers() {
    let binary = require_redis();
    let redis = Redis::start(&binary);
    let publisher = node(&redis, &[]);
    let receiver = node(&redis, &[]);
    let mut sub = connect_ws(receiver.addr()).await;
    let old_epoch = subscribe(&mut sub, "rb", 1).await["epoch"].clone();
    let mut ws = connect_ws(publisher.addr()).await;
    for i in 1..=3 {
        assert_eq!(publish_raw(&mut ws, "rb", &i.to_string(), i).await, i);
        assert_eq!(recv_message(&mut sub, "rb").await.0, i);
    }
    assert!(redis.command(&["FLUSHALL"]).starts_with("+OK"));

    assert_eq!(
        publish_raw(&mut ws, "rb", "\"after\"", 4).await,
        1,
        "a new epoch starts at 1"
    );
    let notice = recv_json(&mut sub).await;
    assert_eq!(
        (
            notice["type"].as_str(),
            notice["channel"].as_str(),
            notice["seq"].as_u64()
        ),
        (Some("subscribed"), Some("rb"), Some(0)),
        "{notice}"
    );
    assert!(
        notice["epoch"].is_string() && notice["epoch"] != old_epoch,
        "{notice}"
    );
    let (seq, data, _) = recv_message(&mut sub, "rb").await;
    assert_eq!((seq, data), (1, json!("after")));

    let receiver_addr = receiver.addr();
    let changes =
        blocking(move || metric_value(receiver_addr, "herald_redis_epoch_changes_total")).await;
    assert_eq!(changes, Some(1.0), "herald_redis_epoch_changes_total");

    let mut late = connect_ws(receiver.addr()).await;
    send_json(
        &mut late,
        &json!({"type":"subscribe","channel":"rb","since":3,"epoch":old_epoch,"id":2}),
    )
    .await;
    let v = recv_json(&mut late).await;
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("history_gap")),
        "{v}"
    );
}

/// A node started while Redis is down prints `listening on`, says it is degraded, refuses
/// publishes and holds subscriptions until Redis comes up; then it serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_while_redis_is_down_serves_once_it_comes_up() {
    let binary = require_redis();
    let mut redis = Redis::unstarted();
    let url = redis.url();
    let mut server = Server::start(&["--redis", &url, "--api-key", API_KEY]);
    let addr = server.addr();
    let (health, refused) = blocking(move || {
        (
            HttpConn::connect(addr).get("/healthz", RECV_TIMEOUT),
            HttpConn::connect(addr).publish(Some(API_KEY), r#"{"channel":"late","data":1}"#),
        )
    })
    .await;
    assert_eq!(health.status, 503, "{}", health.text());
    assert_eq!(health.json()["redis"], "down", "{}", health.text());
    refused.assert_api_error(503, "unavailable");
    let mut ws = connect_ws(addr).await;
    send_text(
        &mut ws,
        r#"{"type":"publish","channel":"late","data":2,"id":1}"#,
    )
    .await;
    let v = recv_json(&mut ws).await;
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str(), v["id"].as_u64()),
        (Some("error"), Some("unavailable"), Some(1)),
        "{v}"
    );
    // A subscription waits for Redis rather than being answered from nothing.
    let mut sub = connect_ws(addr).await;
    send_text(&mut sub, r#"{"type":"subscribe","channel":"late","id":7}"#).await;
    expect_silence(&mut sub, Duration::from_millis(300)).await;

    redis.spawn(&binary);
    let reply = recv_text_within(&mut sub, Duration::from_secs(10)).await;
    let reply: Value = serde_json::from_str(&reply).expect("JSON");
    assert_eq!(
        (reply["type"].as_str(), reply["id"].as_u64()),
        (Some("subscribed"), Some(7)),
        "{reply}"
    );
    let seq = publish_once_redis_serves(
        &mut ws,
        "late",
        "publishes still refused after Redis came up",
    )
    .await;
    let (got, data, _) = recv_message(&mut sub, "late").await;
    assert_eq!((got, data), (seq, json!(3)));
    let health = blocking(move || HttpConn::connect(addr).get("/healthz", RECV_TIMEOUT)).await;
    assert_eq!(health.status, 200, "{}", health.text());
    server.assert_healthy();
}

/// At most 64 publishes of one connection wait for their answer: while Redis hangs, the
/// node stops reading that connection, so a ping sent after 100 publishes is answered
/// only after enough of them were (here refused as `unavailable`), never before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_64_unanswered_publishes_is_not_read_further() {
    let binary = require_redis();
    let redis = Redis::start(&binary);
    let mut a = node(&redis, &["--max-messages-per-second", "100000"]);
    let mut ws = connect_ws(a.addr()).await;
    assert_eq!(publish_raw(&mut ws, "bp", "0", 1000).await, 1);
    redis.signal("STOP");
    // Sent without waiting for answers: 100 publishes, then a ping.
    for id in 1..=100 {
        send_text(
            &mut ws,
            &format!(r#"{{"type":"publish","channel":"bp","data":{id},"id":{id}}}"#),
        )
        .await;
    }
    send_text(&mut ws, r#"{"type":"ping","id":5000}"#).await;
    let mut answered = Vec::new();
    let pong_after = loop {
        let text = recv_text_within(&mut ws, Duration::from_secs(15)).await;
        let v: Value = serde_json::from_str(&text).expect("JSON");
        match v["type"].as_str() {
            Some("pong") => break answered.len(),
            Some("error") => {
                assert_eq!(v["code"], "unavailable", "{v}");
                answered.push(v["id"].as_u64().expect("id"));
            }
            _ => panic!("unexpected {v} while Redis hangs"),
        }
    };
    redis.signal("CONT");
    // The ping comes after the 100 publishes: the node reads it only once fewer than 64
    // of them are unanswered, so at least 37 answers precede the pong. (All 64 refused in
    // one go is the usual case, not a promise: on a busy machine the refusals reach the
    // shard in batches, and reading resumes with the first.) Without the cap the ping
    // would be answered at once, before any publish, as Redis hangs for seconds.
    assert!(
        pong_after > 100 - 64,
        "the ping was read while {} publishes were unanswered (answered before it: {answered:?})",
        100 - pong_after
    );
    assert_eq!(
        answered,
        (1..=pong_after as u64).collect::<Vec<u64>>(),
        "in order"
    );
    a.assert_healthy();
}

/// Every command Redis runs, as `MONITOR` prints it, collected by a thread until Redis
/// goes away.
struct Monitor {
    lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Monitor {
    fn start(redis: &Redis) -> Self {
        use std::io::{BufRead, BufReader, Write};
        let mut s = TcpStream::connect(("127.0.0.1", redis.port)).expect("connect to redis");
        s.write_all(b"MONITOR\r\n").expect("MONITOR");
        let mut reader = BufReader::new(s);
        let mut ok = String::new();
        reader.read_line(&mut ok).expect("MONITOR reply");
        assert_eq!(ok.trim_end(), "+OK");
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&line).into_owned());
                line.clear();
            }
        });
        Self { lines }
    }

    /// Everything Redis ran before this call: a marker command run now must come through.
    fn lines_so_far(&self, redis: &Redis) -> Vec<String> {
        let marker = format!("herald-monitor-marker-{}", std::process::id());
        redis.command(&["ECHO", &marker]);
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            let lines = self.lines.lock().unwrap().clone();
            if lines.iter().any(|l| l.contains(&marker)) {
                return lines;
            }
            assert!(Instant::now() < deadline, "MONITOR shows no marker");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reads_ask_redis_for_no_more_than_the_history_size() {
    const HISTORY: u64 = 10;
    const EXTRA: u64 = 5000;
    let binary = require_redis();
    let redis = Redis::start(&binary);
    let a = node(&redis, &["--history-size", "10"]);
    let b = node(&redis, &["--history-size", "10"]);
    publish_series(a.addr(), "big", "a", 3, Duration::ZERO).await;
    let mut live = connect_ws(a.addr()).await;
    let epoch = subscribe(&mut live, "big", 1).await["epoch"].clone();

    // Thousands of entries behind Herald's back, as another writer or a node with a
    // larger --history-size leaves them: no read may take them all.
    let last = 3 + EXTRA;
    let script = "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do \
                  redis.call('XADD', KEYS[1], i .. '-0', 'd', ARGV[3]) end \
                  redis.call('HSET', KEYS[2], 'seq', ARGV[2]) return 1";
    let reply = redis.command(&[
        "EVAL",
        script,
        "2",
        "herald:{big}:stream",
        "herald:{big}:meta",
        "4",
        &last.to_string(),
        r#"{"filler":true}"#,
    ]);
    assert_eq!(reply, ":1\r\n");
    let monitor = Monitor::start(&redis);

    // Node B has never held the channel: `since` further back than the history is a gap
    // whose oldest is what one read can serve; a near `since` is replayed from the stream.
    let mut far = connect_ws(b.addr()).await;
    send_json(
        &mut far,
        &json!({"type":"subscribe","channel":"big","since":1,"epoch":epoch,"id":2}),
    )
    .await;
    let v = recv_json(&mut far).await;
    assert_eq!(v["code"], "history_gap", "{v}");
    assert_eq!(v["oldest"], last + 1 - HISTORY, "{v}");
    let mut near = connect_ws(b.addr()).await;
    send_json(
        &mut near,
        &json!({"type":"subscribe","channel":"big","since":last - 4,"epoch":epoch,"id":3}),
    )
    .await;
    let replayed = collect(&mut near, "big", 4, RECV_TIMEOUT).await;
    let seqs: Vec<u64> = replayed.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, ((last - 3)..=last).collect::<Vec<_>>());

    // Node A catches up on the jump when the next message is announced: a gap for what
    // the history no longer holds, then the rest of it and the new message.
    let mut publisher = connect_ws(a.addr()).await;
    let seq = publish_raw(&mut publisher, "big", r#"{"after":true}"#, 1).await;
    assert_eq!(seq, last + 1);
    let mut got = Vec::new();
    while got.last() != Some(&seq) {
        let v = recv_json(&mut live).await;
        match v["type"].as_str() {
            Some("gap") => assert!(got.is_empty(), "a gap after messages: {v}"),
            Some("message") => got.push(v["seq"].as_u64().expect("seq")),
            _ => panic!("live subscriber got {v}"),
        }
    }
    assert_eq!(got, ((seq + 1 - HISTORY)..=seq).collect::<Vec<_>>());

    let reads: Vec<String> = monitor
        .lines_so_far(&redis)
        .into_iter()
        .filter(|l| l.contains("\"XRANGE\"") || l.contains("\"XREVRANGE\""))
        .collect();
    assert!(
        reads.len() >= 3,
        "catch-up, oldest and replay reads: {reads:?}"
    );
    for read in &reads {
        assert!(
            read.contains("\"COUNT\""),
            "a stream read without COUNT: {read}"
        );
    }
}

/// A `since` served from the Redis stream goes out in chunks as the subscriber drains,
/// like one served from a home's history: what the node queues for it stays within its
/// outbound budget, and messages published meanwhile follow in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_redis_is_paced_within_the_outbound_budget() {
    const BUDGET: u64 = 65536;
    let binary = require_redis();
    let redis = Redis::start(&binary);
    let publisher = node(
        &redis,
        &[
            "--history-size",
            "100",
            "--max-messages-per-second",
            "100000",
        ],
    );
    let budget = BUDGET.to_string();
    let reader = node(
        &redis,
        &["--history-size", "100", "--outbound-queue-bytes", &budget],
    );
    let data = format!("\"{}\"", "x".repeat(16 * 1024));
    let mut ws = connect_ws(publisher.addr()).await;
    for i in 1..=60 {
        assert_eq!(publish_raw(&mut ws, "paced", &data, i).await, i);
    }
    let epoch =
        subscribe(&mut connect_ws(publisher.addr()).await, "paced", 100).await["epoch"].clone();
    let reader_addr = reader.addr();
    let subscribe_from_zero =
        json!({"type":"subscribe","channel":"paced","since":0,"epoch":epoch,"id":7}).to_string();
    let (mut raw, mut buf) = blocking(move || {
        let (mut raw, buf) = raw_ws(reader_addr);
        std::io::Write::write_all(&mut raw, &client_text(&subscribe_from_zero)).unwrap();
        (raw, buf)
    })
    .await;
    // A 1 MB replay, and a client that reads nothing for a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let peak = blocking(move || {
        metric_value(reader_addr, "herald_shard_outbound_queue_peak_bytes")
            .into_iter()
            .chain(metric_value(
                reader_addr,
                r#"herald_shard_outbound_queue_peak_bytes{shard="1"}"#,
            ))
            .fold(0.0, f64::max)
    })
    .await;
    assert!(
        peak <= (BUDGET + 17 * 1024) as f64,
        "{peak} bytes queued for a subscriber replaying 1 MB"
    );
    for i in 61..=65 {
        assert_eq!(publish_raw(&mut ws, "paced", &data, i).await, i);
    }
    let texts = blocking(move || {
        let mut texts: Vec<String> = Vec::new();
        // The confirmation follows the replay, which reaches 65 when the last publishes
        // landed before it caught up (a busy machine): read until both are in.
        let count =
            |texts: &[String], kind: &str| texts.iter().filter(|t| t.contains(kind)).count();
        while count(&texts, r#""type":"message""#) < 65
            || count(&texts, r#""type":"subscribed""#) == 0
        {
            let frame = read_frame(&mut raw, &mut buf, RECV_TIMEOUT).expect("a frame");
            texts.push(String::from_utf8(frame.payload).unwrap());
        }
        texts
    })
    .await;
    let seqs: Vec<u64> = texts
        .iter()
        .filter(|t| t.contains(r#""type":"message""#))
        .map(|t| {
            serde_json::from_str::<Value>(t).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (1..=65).collect::<Vec<u64>>());
    let subscribed: Vec<&String> = texts
        .iter()
        .filter(|t| t.contains(r#""type":"subscribed""#))
        .collect();
    assert_eq!(subscribed.len(), 1, "{subscribed:?}");
    assert!(subscribed[0].contains(r#""id":7"#), "{}", subscribed[0]);
}

/// A flood from Redis faster than the node's shard takes it. With `--redis-buffer-bytes
/// 4096` the node stops reading Redis while the shard is behind, drops the announcements
/// that do not fit and catches the channel up from its stream: every subscriber gets
/// every message once, in order, and the shard never held more than the buffer and one
/// message of Redis traffic (without the bound it holds whatever the flood outran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_redis_is_held_within_the_buffer_and_caught_up() {
    const BUFFER: u64 = 4096;
    const TOTAL: usize = 3000;
    let binary = require_redis();
    let redis = Redis::start(&binary);
    let buffer = BUFFER.to_string();
    let receiving = node(
        &redis,
        &[
            "--threads",
            "1",
            "--redis-buffer-bytes",
            &buffer,
            "--history-size",
            "5000",
        ],
    );
    let publishing = node(&redis, &["--history-size", "5000"]);
    let mut subscribers = Vec::new();
    for _ in 0..2 {
        let mut ws = connect_ws(receiving.addr()).await;
        subscribe(&mut ws, "flood", 1).await;
        subscribers.push(ws);
    }
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(
                async move { collect(&mut ws, "flood", TOTAL, Duration::from_secs(60)).await },
            )
        })
        .collect();
    let filler = "x".repeat(1000);
    let mut conn = HttpConn::connect(publishing.addr());
    for batch in 0..TOTAL / 500 {
        let messages: Vec<Value> = (0..500)
            .map(|i| json!({"channel": "flood", "data": {"i": batch * 500 + i, "fill": filler}}))
            .collect();
        let answer = conn.publish(Some(API_KEY), &json!({ "messages": messages }).to_string());
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    for reader in readers {
        let got = reader.await.expect("reader");
        assert_consecutive_from_one(&got, TOTAL as u64, "subscriber");
    }
    let waits = metric_value(receiving.addr(), "herald_redis_backlog_waits_total").unwrap_or(0.0);
    let overflows =
        metric_value(receiving.addr(), "herald_redis_push_overflows_total").unwrap_or(0.0);
    assert!(
        waits + overflows > 0.0,
        "a flood of {TOTAL} messages never filled a 4 KiB buffer"
    );
    let peak = metric_value(receiving.addr(), "herald_redis_backlog_peak_bytes").expect("peak");
    // One message more than the buffer: its frame (about 1,030 bytes) and its envelope.
    assert!(
        peak <= (BUFFER + 2048) as f64,
        "the shard held {peak} bytes of Redis traffic past a {BUFFER}-byte buffer"
    );
    eprintln!("flood: {waits} waits for the shard, {overflows} overflows, peak {peak} bytes");
}

/// The metric names a PromQL expression reads: identifiers that are not functions,
/// keywords, label names (inside `{..}` or after `by`/`without`/`on`/`ignoring`), range
/// durations (`[..]`), numbers or Grafana variables (`$__rate_interval`). A metric named
/// like a keyword (`sum`) would be missed; Herald's all start with `herald_`.
fn promql_metric_names(expr: &str) -> Vec<String> {
    // Aggregations may come before their `by (..)` rather than their `(`.
    const KEYWORDS: [&str; 17] = [
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    const LABEL_LISTS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_to = |from: usize, close: char| {
        let mut i = from;
        while i < chars.len() && chars[i] != close {
            if chars[i] == '"' {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c == '"' {
            i = skip_to(i + 1, '"');
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            i += 1;
            while i < chars.len() && (ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if ident(c) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let call = chars.get(next) == Some(&'(');
            if call && LABEL_LISTS.contains(&word.as_str()) {
                i = skip_to(next + 1, ')');
            } else if !call && !KEYWORDS.contains(&word.as_str()) {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_metric_names_skips_functions_labels_and_variables() {
    let expr = r#"histogram_quantile(0.99, sum by (le, instance) (rate(herald_a_bucket{instance=~"$instance", x="}"}[$__rate_interval]))) / on (shard) herald_b > bool 1e9"#;
    assert_eq!(promql_metric_names(expr), ["herald_a_bucket", "herald_b"]);
}

/// `tuning/grafana-dashboard.json` names only metrics a node exports: every expression of
/// every panel and the instance variable's query, against `/metrics` of a node on a real
/// Redis with compression on (the Redis link's and the compression series are there).
/// A metric renamed or dropped in the server fails here with the panel that reads it.
#[test]
fn the_grafana_dashboard_queries_only_metrics_a_node_exports() {
    let binary = require_redis();
    let redis = Redis::start(&binary);
    let server = node(&redis, &["--compression", "shared"]);
    let scrape = HttpConn::connect(server.addr())
        .get("/metrics", RECV_TIMEOUT)
        .text();
    let exported: std::collections::HashSet<&str> = scrape
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/grafana-dashboard.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read the dashboard"))
            .expect("the dashboard is JSON");
    // (where, expression) for every query: panels (rows nest theirs) and template variables.
    let mut queries: Vec<(String, String)> = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .expect("every target has a PromQL expr");
            queries.push((format!("panel {}", panel["title"]), expr.to_owned()));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            // label_values(METRIC, LABEL): only the first argument is a metric.
            let metric = query
                .strip_prefix("label_values(")
                .and_then(|rest| rest.split(',').next())
                .unwrap_or(query);
            queries.push((format!("variable {}", variable["name"]), metric.to_owned()));
        }
    }
    assert!(queries.len() >= 20, "only {} queries", queries.len());

    let mut used = std::collections::HashSet::new();
    for (place, expr) in &queries {
        let names = promql_metric_names(expr);
        assert!(!names.is_empty(), "{place}: no metric in {expr:?}");
        for name in names {
            assert!(
                exported.contains(name.as_str()),
                "{place} queries {name}, which the server does not export ({expr})"
            );
            used.insert(name);
        }
    }
    // The panels the dashboard exists for.
    for wanted in [
        "herald_connections",
        "herald_deliveries_total",
        "herald_publish_flush_seconds_bucket",
        "herald_slow_consumer_closes_total",
        "herald_messages_shed_total",
        "herald_rejected_requests_total",
        "herald_shard_busy_seconds_total",
        "herald_redis_up",
        "herald_compression_saved_bytes_total",
    ] {
        assert!(used.contains(wanted), "no panel reads {wanted}");
    }
}
