//! Cluster on Redis (issue 6, reliability.md group M) against a real `redis-server`:
//! several `herald` processes on one Redis deliver every message to every subscriber
//! exactly once in order, clients of a killed node resume on another with `since`, and a
//! Redis restart loses no acknowledged message while publishes during the outage are
//! refused with `unavailable` (HTTP 503), not acknowledged.
//!
//! Each test starts its own `redis-server` on a free port. `tests/run.sh` installs the
//! Debian package and sets `HERALD_REQUIRE_REDIS=1`, so these tests fail rather than skip
//! in CI; run alone without the package they skip with a message.

mod support;
mod support_deflate;
mod support_http;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use support_http::HttpConn;

const API_KEY: &str = "cluster-key";

/// A `redis-server` of our own, killed on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
    /// Where an append-only file is kept, when the data must survive a restart.
    dir: Option<PathBuf>,
}

fn redis_server_binary() -> Option<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("redis-server"))
        .find(|p| p.is_file())
}

/// The redis-server binary, or `None` (with a message) when the test should skip.
fn require_redis() -> Option<PathBuf> {
    let found = redis_server_binary();
    if found.is_none() {
        assert!(
            std::env::var_os("HERALD_REQUIRE_REDIS").is_none(),
            "redis-server not found although HERALD_REQUIRE_REDIS is set (tests/run.sh installs the Debian package redis-server)"
        );
        eprintln!(
            "SKIPPED: redis-server not found; install the Debian package redis-server (tests/run.sh does) to run the cluster tests"
        );
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Redis {
    /// Memory only: `--save "" --appendonly no`.
    fn start(binary: &PathBuf) -> Self {
        let mut redis = Self {
            child: None,
            port: free_port(),
            dir: None,
        };
        redis.spawn(binary);
        redis
    }

    /// With an append-only file synced on every write, so a restart keeps every
    /// acknowledged publish.
    fn start_persistent(binary: &PathBuf, name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("herald-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("redis data dir");
        let mut redis = Self {
            child: None,
            port: free_port(),
            dir: Some(dir),
        };
        redis.spawn(binary);
        redis
    }

    fn spawn(&mut self, binary: &PathBuf) {
        let mut cmd = Command::new(binary);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""]);
        match &self.dir {
            Some(dir) => {
                cmd.args(["--appendonly", "yes", "--appendfsync", "always"])
                    .arg("--dir")
                    .arg(dir);
            }
            None => {
                cmd.args(["--appendonly", "no"]);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers_ping() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers_ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf).is_ok_and(|n| &buf[..n] == b"+PONG\r\n")
    }

    /// Runs one command over RESP and returns the raw reply.
    fn command(&self, args: &[&str]) -> String {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        s.write_all(request.as_bytes()).expect("send to redis");
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).expect("redis reply");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// How many nodes are subscribed in Redis to `channel`.
    fn nodes_subscribed(&self, channel: &str) -> u32 {
        let reply = self.command(&["PUBSUB", "NUMSUB", &format!("herald:{{{channel}}}")]);
        let count = reply.lines().last().expect("NUMSUB reply");
        count.trim_start_matches(':').parse().expect("NUMSUB count")
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends `signal` (`STOP`, `CONT`) to the running redis-server.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis running").id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// SIGKILL: the harshest stop; only what the append-only file holds survives.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

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
    let Some(binary) = require_redis() else {
        return;
    };
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
    let Some(binary) = require_redis() else {
        return;
    };
    let redis = Redis::start(&binary);
    let history = ["--history-size", "1000"];
    let mut doomed = node(&redis, &history);
    let survivor = node(&redis, &history);
    let publisher = node(&redis, &history);
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
    // Every subscriber is in place before the first publish.
    tokio::time::sleep(Duration::from_millis(300)).await;
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
    let Some(binary) = require_redis() else {
        return;
    };
    let mut redis = Redis::start_persistent(&binary, "restart");
    let mut subscriber_node = node(&redis, &[]);
    let mut publisher_node = node(&redis, &[]);
    let channel = "orders";
    let mut sub = connect_ws(subscriber_node.addr()).await;
    let reply = subscribe(&mut sub, channel, 1).await;
    let epoch = reply["epoch"].as_str().expect("epoch").to_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let publishing = {
        let stop = stop.clone();
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
                let v = recv_json(&mut ws).await;
                assert_eq!(v["id"], id, "{v}");
                match v["type"].as_str() {
                    Some("ack") => acked.push((v["seq"].as_u64().expect("seq"), data)),
                    Some("error") => {
                        assert_eq!(v["code"], "unavailable", "{v}");
                        refused.push(data);
                    }
                    _ => panic!("publish answered with {v}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (acked, refused)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill();
    // While Redis is down: HTTP publishes get 503, the node says it is degraded.
    let publisher_addr = publisher_node.addr();
    let subscriber_addr = subscriber_node.addr();
    let (during, health, metrics) = blocking(move || {
        std::thread::sleep(Duration::from_millis(300));
        let during = HttpConn::connect(publisher_addr)
            .publish(Some(API_KEY), r#"{"channel":"orders","data":"lost?"}"#);
        let health = HttpConn::connect(subscriber_addr).get("/healthz", RECV_TIMEOUT);
        let metrics = HttpConn::connect(subscriber_addr).get("/metrics", RECV_TIMEOUT);
        (during, health, metrics.text())
    })
    .await;
    during.assert_api_error(503, "unavailable");
    assert!(during.header("retry-after").is_some());
    assert_eq!(health.status, 503, "{}", health.text());
    assert!(metrics.contains("herald_redis_up 0"), "{metrics}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.spawn(&binary);
    // Long enough for the nodes to reconnect (backoff ≤ 2 s) and publish again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Release);
    let (acked, refused) = publishing.await.expect("publisher");
    assert!(
        !refused.is_empty(),
        "publishes during the outage were refused"
    );
    let last = acked.last().expect("acked publishes").0;
    assert!(acked.len() > 100, "publishing resumed after the restart");

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
    let Some(binary) = require_redis() else {
        return;
    };
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
    let Some(binary) = require_redis() else {
        return;
    };
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
    tokio::time::sleep(Duration::from_millis(150)).await;
    let killed = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    // Only node A's connection is in pub/sub mode (B holds no channel).
    assert!(
        killed.starts_with(":1"),
        "node A's pub/sub connection: {killed}"
    );
    let (acked, _) = publishing.await.expect("publisher");
    let got = collect(&mut sub, "m", acked.len(), Duration::from_secs(10)).await;
    assert_consecutive_from_one(&got, 200, "subscriber");
    assert_eq!(got, acked);
    assert_eq!(
        redis.nodes_subscribed("m"),
        1,
        "resubscribed after the kill"
    );

    // The node leaves the Redis channel when its last local subscriber does.
    drop(sub);
    tokio::time::sleep(Duration::from_millis(300)).await;
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
    let Some(binary) = require_redis() else {
        return;
    };
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
    tokio::time::sleep(Duration::from_millis(300)).await;
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
    let Some(binary) = require_redis() else {
        return;
    };
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
    // The event loop is not blocked on Redis: a ping is answered at once meanwhile.
    ping_pong(&mut sub).await;
    assert!(started.elapsed() < Duration::from_millis(500));
    let v = recv_json(&mut ws).await;
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{v}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "refused within the reply timeout"
    );
    redis.signal("CONT");

    // Recovers by itself: publishing works again within a few seconds, and the
    // subscriber receives what is acknowledged after the hang.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut id = 10;
    let seq = loop {
        id += 1;
        send_text(
            &mut ws,
            &format!(r#"{{"type":"publish","channel":"h","data":3,"id":{id}}}"#),
        )
        .await;
        let v = recv_json(&mut ws).await;
        if v["type"] == "ack" {
            break v["seq"].as_u64().expect("seq");
        }
        assert_eq!(v["code"], "unavailable", "{v}");
        assert!(Instant::now() < deadline, "no recovery after CONT");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
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
    let Some(binary) = require_redis() else {
        return;
    };
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
    let Some(binary) = require_redis() else {
        return;
    };
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
