//! Who is connected, across a cluster (issue 16) against a real `redis-server` and three
//! `herald` processes: presence lists and counts the whole cluster's members while
//! clients come and go on different nodes, and drops a node killed with `kill -9` within
//! the stated bound; joins and leaves reach every node in the same place among the
//! channel's messages; disconnect and unsubscribe by user reach the user's connections
//! on every node, and disconnect by connection (`NODE/ID`) the node that holds it; and every server API endpoint answers for the cluster on a node the
//! user is not on.
//!
//! Each test starts its own `redis-server` on a free port; without it every test fails
//! with a message saying so, never skips.

use crate::support;
use crate::support_http;
use crate::support_redis::{Redis, require_redis, wait_redis_up};
use crate::support_redis_cluster;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use support_http::Response;

const SECRET: &str = "herald-test-secret-0123456789abcdef";
const KEY: &str = "cluster-identity-key";
/// The bound README states for a dead node's members (`PRESENCE_TTL`), plus the time
/// one read of presence takes on a busy machine.
const DEAD_NODE_BOUND: Duration = Duration::from_secs(6);
const READ_SLACK: Duration = Duration::from_secs(2);

/// A node with presence and join/leave on for every channel, once its Redis link is up.
fn node(redis: &Redis) -> Server {
    node_on(&redis.url())
}

/// [`node`] on the Redis (or Redis Cluster) at `url`.
fn node_on(url: &str) -> Server {
    let server = Server::start(&[
        "--redis",
        url,
        "--api-key",
        KEY,
        "--jwt-secret",
        SECRET,
        "--presence",
        "--join-leave",
    ]);
    wait_redis_up(server.addr());
    server
}

fn cluster(redis: &Redis) -> Vec<Server> {
    (0..3).map(|_| node(redis)).collect()
}

fn token(user: &str) -> String {
    fresh_token(
        SECRET,
        json!({"sub": user, "channels": ["*"], "publish": ["*"],
            "info": {"name": user.to_uppercase()}}),
    )
}

async fn call(server: &Server, method: &str, target: &str, body: &str) -> Response {
    support_http::api_call(server.addr(), KEY, method, target, body).await
}

/// The `seq` of each message of a history answer, in its order.
fn message_seqs(history: &Value) -> Vec<u64> {
    let messages = history["messages"].as_array().expect("messages");
    messages
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

async fn get(server: &Server, target: &str) -> Value {
    let response = call(server, "GET", target, "").await;
    assert_eq!(response.status, 200, "{target}: {}", response.text());
    response.json()
}

/// `user` connected to `server`, subscribed to `channel`, its own join read.
async fn member(server: &Server, user: &str, channel: &str) -> Ws {
    let mut ws = connect(server.addr(), &format!("/ws?token={}", token(user))).await;
    subscribe(&mut ws, channel, 1).await;
    let own = recv_json(&mut ws).await;
    assert_eq!(
        (own["type"].as_str(), own["user"].as_str()),
        (Some("join"), Some(user)),
        "{own}"
    );
    ws
}

/// Reads `/api/presence_stats` on `server` until it says `(connections, users)`;
/// returns how long that took.
async fn stats_reach(
    server: &Server,
    channel: &str,
    want: (u64, u64),
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let stats = get(server, &format!("/api/presence_stats?channel={channel}")).await;
        let got = (
            stats["connections"].as_u64().unwrap(),
            stats["users"].as_u64().unwrap(),
        );
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "presence_stats stayed {stats}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every member over the pages of `/api/presence` (`limit` a page), sorted by user.
async fn all_members(server: &Server, channel: &str, limit: usize) -> Vec<Value> {
    let mut members = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..20 {
        let mut target = format!("/api/presence?channel={channel}&limit={limit}");
        if let Some(cursor) = &cursor {
            target.push_str(&format!("&cursor={}", support_http::query_escape(cursor)));
        }
        let page = get(server, &target).await;
        let listed = page["members"].as_array().unwrap();
        assert!(listed.len() <= limit, "{page}");
        members.extend(listed.iter().cloned());
        match page["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    members.sort_by_key(|m| m["user"].as_str().unwrap_or("").to_owned());
    members
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_spans_the_nodes_and_a_killed_node_drops_out_within_the_bound() {
    let redis = Redis::start(&require_redis());
    let mut nodes = cluster(&redis);
    let _ann = member(&nodes[0], "ann", "room").await;
    let bob = member(&nodes[1], "bob", "room").await;
    let _bob_again = member(&nodes[1], "bob", "room").await;
    let _carol = member(&nodes[2], "carol", "room").await;
    stats_reach(&nodes[0], "room", (4, 3), Duration::from_secs(5)).await;
    let written = metric_value(nodes[1].addr(), "herald_redis_presence_writes_total");
    assert_eq!(written, Some(2.0), "node 1 recorded its two joins");

    // Pages of 3 over 4 members on 3 nodes: every member once, with its info.
    let members = all_members(&nodes[1], "room", 3).await;
    let users: Vec<&str> = members
        .iter()
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["ann", "bob", "bob", "carol"]);
    assert_eq!(members[0]["info"], json!({"name": "ANN"}));
    let mut conns: Vec<&str> = members
        .iter()
        .map(|m| m["conn"].as_str().unwrap())
        .collect();
    conns.dedup();
    assert_eq!(conns.len(), 4, "each connection once: {members:?}");

    // The same count over a WebSocket of a node, for a subscriber there.
    let mut watcher = connect(nodes[2].addr(), &format!("/ws?token={}", token("dan"))).await;
    send_text(
        &mut watcher,
        r#"{"type":"presence_stats","channel":"room","id":7}"#,
    )
    .await;
    let stats = recv_json(&mut watcher).await;
    assert_eq!(
        (stats["connections"].as_u64(), stats["id"].as_u64()),
        (Some(4), Some(7)),
        "{stats}"
    );
    send_text(
        &mut watcher,
        r#"{"type":"presence","channel":"room","limit":2,"id":8}"#,
    )
    .await;
    let page = recv_json(&mut watcher).await;
    assert_eq!(page["members"].as_array().map(Vec::len), Some(2), "{page}");
    assert!(page["cursor"].is_string(), "{page}");

    // A client that leaves drops out at once.
    drop(bob);
    stats_reach(&nodes[0], "room", (3, 3), Duration::from_secs(5)).await;

    // Redis loses everything: each node writes its members again at its next refresh.
    assert_eq!(redis.command(&["FLUSHALL"]), "+OK\r\n");
    stats_reach(
        &nodes[0],
        "room",
        (3, 3),
        Duration::from_secs(2) + READ_SLACK,
    )
    .await;

    // kill -9: carol's node cannot say she left; its entries stop counting in time.
    nodes[2].signal("KILL");
    assert!(nodes[2].wait_exit(Duration::from_secs(5)).is_some());
    let took = stats_reach(&nodes[0], "room", (2, 2), DEAD_NODE_BOUND + READ_SLACK).await;
    eprintln!("the killed node's member dropped out of presence after {took:?}");
    let users: Vec<String> = all_members(&nodes[1], "room", 10)
        .await
        .iter()
        .map(|m| m["user"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(users, ["ann", "bob"]);
    let info = get(&nodes[0], "/api/info").await;
    assert_eq!(
        info["nodes"].as_array().map(Vec::len),
        Some(2),
        "the dead node is gone from info: {info}"
    );
    nodes.pop();
}

/// What a watcher saw of `channel`: `m<seq>` for messages, `+user`/`-user` for joins
/// and leaves, until `count` messages arrived.
async fn sequence(ws: &mut Ws, count: u64) -> Vec<String> {
    let mut seen = Vec::new();
    let mut messages = 0;
    while messages < count {
        let v = recv_json(ws).await;
        match v["type"].as_str() {
            Some("message") => {
                messages += 1;
                seen.push(format!("m{}", v["seq"]));
            }
            Some("join") => seen.push(format!("+{}", v["user"].as_str().unwrap())),
            Some("leave") => seen.push(format!("-{}", v["user"].as_str().unwrap())),
            _ => panic!("unexpected frame {v}"),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joins_and_leaves_keep_one_place_among_the_messages_on_every_node() {
    let redis = Redis::start(&require_redis());
    let nodes = cluster(&redis);
    let mut watchers = Vec::new();
    for node in &nodes[..2] {
        watchers.push(member(node, "watcher", "room").await);
    }
    // The second watcher's join reaches the first one.
    let join = recv_json(&mut watchers[0]).await;
    assert_eq!(join["type"], "join", "{join}");

    // Step by step: a join or leave published between two messages is between them.
    let mut publisher = connect(nodes[2].addr(), &format!("/ws?token={}", token("pub"))).await;
    publish_raw(&mut publisher, "room", "1", 1).await;
    let mut eve = member(&nodes[2], "eve", "room").await;
    publish_raw(&mut publisher, "room", "2", 2).await;
    // Eve leaves once the second message reached her.
    let _ = recv_message(&mut eve, "room").await;
    send_text(
        &mut eve,
        r#"{"type":"unsubscribe","channel":"room","id":2}"#,
    )
    .await;
    assert_eq!(recv_json(&mut eve).await["type"], "unsubscribed");
    stats_reach(&nodes[0], "room", (2, 1), Duration::from_secs(5)).await;
    publish_raw(&mut publisher, "room", "3", 3).await;
    for (i, watcher) in watchers.iter_mut().enumerate() {
        assert_eq!(
            sequence(watcher, 3).await,
            ["m1", "+eve", "m2", "-eve", "m3"],
            "watcher on node {i}"
        );
    }

    // Under load: messages from one node while clients come and go on the others;
    // both watchers see the same interleaving.
    let addr = nodes[2].addr();
    let publishing = tokio::spawn(async move {
        let mut ws = connect(addr, &format!("/ws?token={}", token("pub"))).await;
        for i in 0..60u64 {
            publish_raw(&mut ws, "room", &i.to_string(), i + 10).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    for round in 0..6 {
        let node = &nodes[round % 2];
        let mut ws = connect(
            node.addr(),
            &format!("/ws?token={}", token(&format!("u{round}"))),
        )
        .await;
        subscribe(&mut ws, "room", 1).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(ws);
    }
    publishing.await.expect("publisher");
    // Once every leave is recorded (and so announced), one last message closes the run.
    stats_reach(&nodes[0], "room", (2, 1), Duration::from_secs(5)).await;
    publish_raw(&mut publisher, "room", "\"end\"", 99).await;
    let first = sequence(&mut watchers[0], 61).await;
    let second = sequence(&mut watchers[1], 61).await;
    let joins = first.iter().filter(|s| s.starts_with('+')).count();
    let leaves = first.iter().filter(|s| s.starts_with('-')).count();
    assert_eq!(
        (joins, leaves),
        (6, 6),
        "every join and leave reached the watcher: {first:?}"
    );
    assert_eq!(first, second, "the same order on both nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnect_and_unsubscribe_by_user_reach_every_node() {
    let redis = Redis::start(&require_redis());
    let nodes = cluster(&redis);
    let mut ann = Vec::new();
    for node in &nodes[1..] {
        ann.push(member(node, "ann", "room").await);
    }
    let mut bob = member(&nodes[2], "bob", "room").await;
    // The API on the node ann is not on.
    let unsubscribed = call(
        &nodes[0],
        "POST",
        "/api/unsubscribe",
        r#"{"user":"ann","channel":"room"}"#,
    )
    .await;
    assert_eq!(unsubscribed.status, 200, "{}", unsubscribed.text());
    assert_eq!(unsubscribed.json(), json!({"unsubscribed": 2}));
    for ws in &mut ann {
        loop {
            let v = recv_json(ws).await;
            if v["type"] == "unsubscribed" {
                assert_eq!(v["channel"], "room");
                break;
            }
            assert!(matches!(v["type"].as_str(), Some("join" | "leave")), "{v}");
        }
    }
    let disconnected = call(
        &nodes[0],
        "POST",
        "/api/disconnect",
        r#"{"user":"ann","code":4000,"reason":"bye"}"#,
    )
    .await;
    assert_eq!(disconnected.json(), json!({"disconnected": 2}));
    for ws in &mut ann {
        assert_eq!(recv_close_code(ws, Duration::from_secs(5)).await, 4000);
    }
    // Bob, on a node ann was on, is untouched: he sees her leave and still answers.
    send_text(&mut bob, r#"{"type":"ping"}"#).await;
    loop {
        let v = recv_json(&mut bob).await;
        match v["type"].as_str() {
            Some("pong") => break,
            Some("join" | "leave") => assert_eq!(v["user"], "ann", "{v}"),
            _ => panic!("bob got {v}"),
        }
    }
    let none = call(&nodes[1], "POST", "/api/disconnect", r#"{"user":"nobody"}"#).await;
    assert_eq!(none.json(), json!({"disconnected": 0}));

    // One connection, named as presence lists it, from a third node.
    let page = get(&nodes[0], "/api/presence?channel=room").await;
    let conn = page["members"][0]["conn"].as_str().unwrap().to_owned();
    assert_eq!(page["members"][0]["user"], "bob", "{page}");
    let body = json!({"conn": conn, "code": 4001, "reason": "token revoked"}).to_string();
    let one = call(&nodes[1], "POST", "/api/disconnect", &body).await;
    assert_eq!(one.json(), json!({"disconnected": 1}));
    assert_eq!(
        recv_close_code(&mut bob, Duration::from_secs(5)).await,
        4001
    );
    let gone = call(&nodes[1], "POST", "/api/disconnect", &body).await;
    assert_eq!(gone.json(), json!({"disconnected": 0}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_endpoint_answers_for_the_cluster_on_a_node_the_user_is_not_on() {
    let redis = Redis::start(&require_redis());
    let nodes = cluster(&redis);
    let _ann = member(&nodes[1], "ann", "room").await;
    let _bob = member(&nodes[2], "bob", "room").await;
    let _other = member(&nodes[2], "bob", "lobby").await;
    let mut publisher = connect(nodes[1].addr(), &format!("/ws?token={}", token("ann"))).await;
    for i in 1..=3 {
        publish_raw(&mut publisher, "room", &format!("{{\"n\":{i}}}"), i).await;
    }
    stats_reach(&nodes[0], "room", (2, 2), Duration::from_secs(5)).await;
    let page = get(&nodes[0], "/api/presence?channel=room").await;
    assert_eq!(page["members"].as_array().map(Vec::len), Some(2), "{page}");

    let history = get(&nodes[0], "/api/history?channel=room&limit=2").await;
    let data: Vec<&Value> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["data"])
        .collect();
    assert_eq!(data, [&json!({"n":1}), &json!({"n":2})], "{history}");
    assert_eq!(history["seq"], 3, "{history}");
    let newest = get(
        &nodes[0],
        "/api/history?channel=room&since=1&newest_first=true",
    )
    .await;
    let seqs = message_seqs(&newest);
    assert_eq!(seqs, [3, 2], "{newest}");

    // Past one read of the stream (64 entries), and bounded by bytes: half the default
    // 1 MiB outbound budget, at least one message.
    for i in 1..=70u64 {
        publish_raw(&mut publisher, "long", &i.to_string(), 100 + i).await;
    }
    let long = get(&nodes[0], "/api/history?channel=long&since=3&limit=1000").await;
    let seqs = message_seqs(&long);
    assert_eq!(seqs, (4..=70).collect::<Vec<u64>>());
    let newest = get(
        &nodes[0],
        "/api/history?channel=long&limit=66&newest_first=true",
    )
    .await;
    let seqs = message_seqs(&newest);
    assert_eq!(seqs, (5..=70).rev().collect::<Vec<u64>>());
    let big = format!("\"{}\"", "x".repeat(40 * 1024));
    for i in 1..=16u64 {
        publish_raw(&mut publisher, "big", &big, 200 + i).await;
    }
    let bounded = call(&nodes[0], "GET", "/api/history?channel=big&limit=100", "").await;
    let listed = bounded.json()["messages"].as_array().unwrap().len();
    assert!(
        bounded.body.len() <= 512 * 1024 && (10..16).contains(&listed),
        "{listed} messages in {} bytes",
        bounded.body.len()
    );

    // Channel counts are reported every 2 s by each node.
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let channels = get(&nodes[0], "/api/channels").await;
        if channels["channels"]
            == json!([{"channel":"lobby","subscribers":1},{"channel":"room","subscribers":2}])
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "channels never summed the nodes: {channels}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let first = get(&nodes[0], "/api/channels?limit=1").await;
    assert_eq!(first["cursor"], "lobby", "{first}");
    let rest = get(&nodes[0], "/api/channels?limit=1&cursor=lobby").await;
    assert_eq!(
        (rest["channels"][0]["channel"].as_str(), &rest["cursor"]),
        (Some("room"), &Value::Null),
        "{rest}"
    );
    let filtered = get(&nodes[0], "/api/channels?pattern=lobby").await;
    assert_eq!(
        filtered["channels"].as_array().map(Vec::len),
        Some(1),
        "{filtered}"
    );

    let info = get(&nodes[0], "/api/info").await;
    let listed = info["nodes"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{info}");
    assert!(
        listed.iter().all(|n| n["version"] == info["version"]),
        "{info}"
    );
    assert!(
        listed.iter().any(|n| n["connections"].as_u64() >= Some(2)),
        "{info}"
    );
    assert!(listed.iter().any(|n| n["node"] == info["node"]), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_redis_cluster_presence_join_leave_and_orders_span_the_nodes() {
    let redis = support_redis_cluster::RedisCluster::start("identity");
    let seeds = redis.seeds();
    let nodes: Vec<Server> = (0..3).map(|_| node_on(&seeds)).collect();
    // Channels in different slots, so that more than one master holds presence.
    for channel in ["room", "hall", "desk"] {
        let mut ann = member(&nodes[1], "ann", channel).await;
        let _bob = member(&nodes[2], "bob", channel).await;
        let join = recv_json(&mut ann).await;
        assert_eq!(
            (join["type"].as_str(), join["user"].as_str()),
            (Some("join"), Some("bob"))
        );
        stats_reach(&nodes[0], channel, (2, 2), Duration::from_secs(5)).await;
        let users: Vec<String> = all_members(&nodes[0], channel, 1)
            .await
            .iter()
            .map(|m| m["user"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(users, ["ann", "bob"], "{channel}");
        let mut publisher = connect(nodes[0].addr(), &format!("/ws?token={}", token("p"))).await;
        publish_raw(&mut publisher, channel, "1", 1).await;
        let history = get(&nodes[0], &format!("/api/history?channel={channel}")).await;
        assert_eq!(history["seq"], 1, "{history}");
        let unsubscribed = call(
            &nodes[0],
            "POST",
            "/api/unsubscribe",
            &format!(r#"{{"user":"ann","channel":"{channel}"}}"#),
        )
        .await;
        assert_eq!(unsubscribed.json(), json!({"unsubscribed": 1}), "{channel}");
        stats_reach(&nodes[0], channel, (1, 1), Duration::from_secs(5)).await;
    }
    let info = get(&nodes[0], "/api/info").await;
    assert_eq!(info["nodes"].as_array().map(Vec::len), Some(3), "{info}");
}
