//! Herald on a real Redis Cluster (issue 15): three masters and three replicas of
//! Debian's `redis-server` on loopback ports, made a cluster with
//! `redis-cli --cluster create ... --cluster-replicas 1`, and three `herald` nodes on it
//! with `--redis redis+cluster://...`. Each test starts and stops its own cluster.
//!
//! Without `redis-server` and `redis-cli` (Debian package `redis-server`, which
//! `tests/run.sh` installs) every test fails with a message saying so, never skips.

use crate::support;
use crate::support_http;
use crate::support_redis_cluster;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use support_http::HttpConn;
use support_redis_cluster::client::*;
use support_redis_cluster::{RedisCluster, wait_for};

const API_KEY: &str = "cluster-key";

/// A `herald` node on the cluster, once its link is up.
fn herald(cluster: &RedisCluster, extra: &[&str]) -> Server {
    let seeds = cluster.seeds();
    let mut args = vec!["--redis", &seeds, "--api-key", API_KEY];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    wait_for(Duration::from_secs(15), "the node's redis link", || {
        HttpConn::connect(server.addr())
            .get("/healthz", RECV_TIMEOUT)
            .status
            == 200
    });
    server
}

/// `count` channel names whose slots cover every master, `per_master` each.
fn channels_on_every_master(cluster: &RedisCluster, per_master: usize) -> Vec<String> {
    let mut by_owner: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        let name = format!("room-{i}");
        let owner = cluster.owner(&name);
        let names = by_owner.entry(owner).or_default();
        if names.len() < per_master {
            names.push(name);
        }
        if by_owner.len() == 3 && by_owner.values().all(|n| n.len() == per_master) {
            break;
        }
    }
    by_owner.into_values().flatten().collect()
}

/// Per channel, the acknowledged `(seq, data)` in seq order.
type Acked = HashMap<String, Vec<(u64, String)>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_on_a_redis_cluster_deliver_every_channel_once_in_order() {
    let cluster = RedisCluster::start("cluster-delivery");
    let nodes: Vec<Server> = (0..3).map(|_| herald(&cluster, &[])).collect();
    let channels = channels_on_every_master(&cluster, 2);
    let mut subscribers = Vec::new();
    for node in &nodes {
        let mut ws = connect_ws(node.addr()).await;
        let epochs = subscribe_all(&mut ws, &channels).await;
        subscribers.push((ws, epochs));
    }
    // Sharded pub/sub: each node listens on the master that owns the channel's slot,
    // with SSUBSCRIBE, and nothing goes through plain (cluster-wide) pub/sub.
    for channel in &channels {
        let owner = cluster.owner(channel);
        let node = cluster
            .nodes
            .iter()
            .find(|n| n.port == owner)
            .expect("owner");
        let key = format!("herald:{{{channel}}}");
        let shard = node.cli(&["PUBSUB", "SHARDNUMSUB", &key]);
        assert_eq!(
            shard.lines().nth(1).map(str::trim),
            Some("3"),
            "{channel}: {shard}"
        );
        let plain = node.cli(&["PUBSUB", "NUMSUB", &key]);
        assert_eq!(
            plain.lines().nth(1).map(str::trim),
            Some("0"),
            "{channel}: {plain}"
        );
    }
    // Every node publishes to every channel, interleaved.
    let per_node = 10u64;
    let publishers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(n, node)| {
            let (addr, channels) = (node.addr(), channels.clone());
            tokio::spawn(async move {
                let mut ws = connect_ws(addr).await;
                let mut acked: Acked = HashMap::new();
                let mut id = 0;
                for i in 0..per_node {
                    for channel in &channels {
                        id += 1;
                        let data = json!({"node": n, "i": i}).to_string();
                        let seq = publish_raw(&mut ws, channel, &data, id).await;
                        acked.entry(channel.clone()).or_default().push((seq, data));
                    }
                }
                acked
            })
        })
        .collect();
    let mut acked: Acked = HashMap::new();
    for publisher in publishers {
        for (channel, mut list) in publisher.await.expect("publisher") {
            acked.entry(channel).or_default().append(&mut list);
        }
    }
    let total = per_node as usize * 3;
    for list in acked.values_mut() {
        list.sort();
        let seqs: Vec<u64> = list.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=total as u64).collect::<Vec<_>>(),
            "one seq per publish"
        );
    }
    for (n, (ws, epochs)) in subscribers.iter_mut().enumerate() {
        let seen = read_all(ws, epochs, total, Duration::from_secs(20)).await;
        for channel in &channels {
            let got: Vec<(u64, String)> = seen
                .get(channel)
                .map(|m| m.iter().map(|(_, s, d)| (*s, d.clone())).collect())
                .unwrap_or_default();
            assert_eq!(
                got, acked[channel],
                "node {n}, {channel}: every message once, in order"
            );
        }
    }
    // Replay from `since` on another node than the publishers' last.
    let mut late = connect_ws(nodes[2].addr()).await;
    let channel = &channels[0];
    let epoch = subscribers[0].1[channel].clone();
    send_json(
        &mut late,
        &json!({"type":"subscribe","channel":channel,"since":25,"epoch":epoch,"id":1}),
    )
    .await;
    let mut replayed = Vec::new();
    for _ in 0..5 {
        let (seq, data, _) = recv_message(&mut late, channel).await;
        replayed.push((seq, data.to_string()));
    }
    let reply = recv_json(&mut late).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["seq"], total as u64);
    assert_eq!(replayed, acked[channel][25..]);
    for mut node in nodes {
        node.assert_healthy();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_master_refuses_its_slots_until_its_replica_serves_them() {
    fail_over_under_load("cluster-failover", "KILL").await;
}

/// A hung master keeps its sockets open: no disconnection tells the nodes, and their
/// subscriptions on it go quiet. The probe finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_master_refuses_its_slots_until_its_replica_serves_them() {
    fail_over_under_load("cluster-hung", "STOP").await;
}

/// Three nodes; one publishes steadily to a channel on each master, the others listen;
/// the first channel's master gets `signal` (`KILL` or `STOP`) and its replica takes
/// over.
async fn fail_over_under_load(name: &str, signal: &str) {
    let mut cluster = RedisCluster::start(name);
    let nodes: Vec<Server> = (0..3).map(|_| herald(&cluster, &[])).collect();
    let channels = channels_on_every_master(&cluster, 1);
    let victim = cluster.owner(&channels[0]);
    let mut subscribers = Vec::new();
    for node in &nodes[1..] {
        let mut ws = connect_ws(node.addr()).await;
        let epochs = subscribe_all(&mut ws, &channels).await;
        subscribers.push((ws, epochs));
    }
    let count = 120;
    let progress = Arc::new(AtomicU64::new(0));
    let publishers: Vec<_> = channels
        .iter()
        .map(|channel| {
            let progress = if *channel == channels[0] {
                progress.clone()
            } else {
                Arc::new(AtomicU64::new(0))
            };
            tokio::spawn(publish_steadily(
                nodes[0].addr(),
                channel.clone(),
                count,
                progress,
            ))
        })
        .collect();
    while progress.load(Ordering::Relaxed) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = Instant::now();
    cluster.signal(victim, signal);
    let mut results = Vec::new();
    for publisher in publishers {
        results.push(publisher.await.expect("publisher"));
    }
    cluster.kill(victim);
    cluster.wait_ok();
    assert_ne!(
        cluster.owner(&channels[0]),
        victim,
        "a replica took the slots over"
    );

    // Served again: the first acknowledgement after the last refusal (one acknowledged
    // just after the kill was on its way before it).
    let victim_result = &results[0];
    let last_refusal = *victim_result.refused.last().expect("refusals meanwhile");
    let resumed = victim_result
        .acked
        .iter()
        .find(|(_, _, at)| *at > last_refusal)
        .map(|(_, _, at)| *at - killed_at)
        .expect("publishes resumed after the failover");
    let refused: Vec<usize> = results.iter().map(|r| r.refused.len()).collect();
    eprintln!(
        "failover after SIG{signal}: the master's slots served again {resumed:?} after the signal; refusals per channel {refused:?} (the first is its)"
    );
    assert!(
        refused[0] > 0,
        "publishes to the dead master's slots were refused meanwhile"
    );

    // Every acknowledged message reaches every subscriber once, in order, unless Redis
    // lost it in the failover: then the subscriber was told with a new epoch.
    let lost_before = Some(killed_at + resumed);
    for (n, (ws, epochs)) in subscribers.iter_mut().enumerate() {
        assert_delivered(n, ws, epochs, &channels, &results, lost_before).await;
    }
    for mut node in nodes {
        node.assert_healthy();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_migrated_while_subscribers_listen_loses_nothing() {
    let cluster = RedisCluster::start("cluster-migration");
    let nodes: Vec<Server> = (0..3).map(|_| herald(&cluster, &[])).collect();
    let channels = channels_on_every_master(&cluster, 1);
    let from = cluster.owner(&channels[0]);
    let to = cluster.owner(&channels[1]);
    let mut subscribers = Vec::new();
    for node in &nodes[1..] {
        let mut ws = connect_ws(node.addr()).await;
        let epochs = subscribe_all(&mut ws, &channels).await;
        subscribers.push((ws, epochs));
    }
    let progress = Arc::new(AtomicU64::new(0));
    let publishers: Vec<_> = channels
        .iter()
        .map(|channel| {
            let progress = progress.clone();
            tokio::spawn(publish_steadily(
                nodes[0].addr(),
                channel.clone(),
                100,
                progress,
            ))
        })
        .collect();
    while progress.load(Ordering::Relaxed) < 60 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let slot = cluster.slot(&channels[0]);
    let moved = Instant::now();
    // Blocks this worker only: the publishers run on the others.
    cluster.migrate(slot, from, to);
    eprintln!(
        "migration: slot {slot} moved from {from} to {to} in {:?}",
        moved.elapsed()
    );
    let mut results = Vec::new();
    for publisher in publishers {
        results.push(publisher.await.expect("publisher"));
    }
    assert_eq!(cluster.owner(&channels[0]), to);
    let refused: Vec<usize> = results.iter().map(|r| r.refused.len()).collect();
    eprintln!("migration: refusals per channel {refused:?} (the first is the moved one)");
    for (n, (ws, epochs)) in subscribers.iter_mut().enumerate() {
        assert_delivered(n, ws, epochs, &channels, &results, None).await;
    }
    // The nodes listen on the new owner now.
    let key = format!("herald:{{{}}}", channels[0]);
    let new_owner = cluster.nodes.iter().find(|n| n.port == to).expect("owner");
    wait_for(
        Duration::from_secs(10),
        "subscriptions on the new owner",
        || {
            let reply = new_owner.cli(&["PUBSUB", "SHARDNUMSUB", &key]);
            reply.lines().nth(1).map(str::trim) == Some("2")
        },
    );
    for mut node in nodes {
        node.assert_healthy();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgement_after_replicas_hold_the_message_is_an_option() {
    let cluster = RedisCluster::start("cluster-wait");
    let plain = herald(&cluster, &[]);
    let waiting = herald(&cluster, &["--redis-ack-replicas", "1"]);
    let greedy = herald(&cluster, &["--redis-ack-replicas", "2"]);
    let channels = channels_on_every_master(&cluster, 1);
    let mut subscriber = connect_ws(plain.addr()).await;
    subscribe(&mut subscriber, &channels[0], 1).await;
    // Warm both paths (connections, scripts) before timing them.
    round_trips(plain.addr(), &channels[1], 20).await;
    round_trips(waiting.addr(), &channels[1], 20).await;
    let without = round_trips(plain.addr(), &channels[2], 200).await;
    let with = round_trips(waiting.addr(), &channels[2], 200).await;
    eprintln!("publish round trip: {without:?} acknowledged by the master, {with:?} after WAIT 1");
    let mut ws = connect_ws(waiting.addr()).await;
    let seq = publish_raw(&mut ws, &channels[0], "\"safe\"", 1).await;
    let (got, data, _) = recv_message(&mut subscriber, &channels[0]).await;
    assert_eq!((got, data), (seq, json!("safe")));
    // Each master has one replica: two never confirm, so nothing is acknowledged.
    let mut ws = connect_ws(greedy.addr()).await;
    send_json(
        &mut ws,
        &json!({"type":"publish","channel":&channels[0],"data":1,"id":1}),
    )
    .await;
    let reply = recv_json(&mut ws).await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    for mut node in [plain, waiting, greedy] {
        node.assert_healthy();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_seq_given_to_a_new_message_is_announced_as_a_new_epoch() {
    let cluster = RedisCluster::start("cluster-reuse");
    let nodes: Vec<Server> = (0..3).map(|_| herald(&cluster, &[])).collect();
    let channel = &channels_on_every_master(&cluster, 1)[0];
    let mut subscriber = connect_ws(nodes[1].addr()).await;
    let first = subscribe(&mut subscriber, channel, 1).await;
    let mut publisher = connect_ws(nodes[0].addr()).await;
    for i in 1..=5u64 {
        assert_eq!(
            publish_raw(&mut publisher, channel, &i.to_string(), i).await,
            i
        );
        assert_eq!(recv_message(&mut subscriber, channel).await.0, i);
    }
    // What a failover that lost the last write leaves: the new master one message
    // behind, in the same epoch.
    let owner = cluster.owner(channel);
    let master = cluster
        .nodes
        .iter()
        .find(|n| n.port == owner)
        .expect("owner");
    let meta = format!("herald:{{{channel}}}:meta");
    let stream = format!("herald:{{{channel}}}:stream");
    assert!(master.cli(&["HSET", &meta, "seq", "4"]).contains('0'));
    assert!(master.cli(&["XDEL", &stream, "5-0"]).contains('1'));
    let reset = master.cli(&["XSETID", &stream, "4-0", "MAXDELETEDID", "4-0"]);
    assert!(reset.contains("OK"), "{reset}");
    // A node that neither acknowledged nor delivered seq 5 publishes: Redis numbers it 5.
    let mut other = connect_ws(nodes[2].addr()).await;
    assert_eq!(publish_raw(&mut other, channel, "\"new\"", 1).await, 5);
    // The subscriber's node delivered another 5: it is told of a new epoch, not left
    // without the new message.
    let notice = recv_json(&mut subscriber).await;
    assert_eq!(notice["type"], "subscribed", "{notice}");
    assert_eq!(notice["seq"], 0, "{notice}");
    assert_ne!(notice["epoch"], first["epoch"], "{notice}");
    let seq = publish_raw(&mut other, channel, "\"after\"", 2).await;
    let (got, data, _) = recv_message(&mut subscriber, channel).await;
    assert_eq!((got, data), (seq, json!("after")));
    for mut node in nodes {
        node.assert_healthy();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_of_a_killed_node_resume_on_another_without_loss() {
    let cluster = RedisCluster::start("cluster-node-killed");
    let history = ["--history-size", "1000"];
    let mut doomed = herald(&cluster, &history);
    let survivor = herald(&cluster, &history);
    let publisher = herald(&cluster, &history);
    let channel = channels_on_every_master(&cluster, 1)[0].clone();
    let total = 150;
    let subscribers: Vec<_> = (0..3)
        .map(|_| {
            let channel = channel.clone();
            tokio::spawn(resuming_subscriber(
                doomed.addr(),
                survivor.addr(),
                channel,
                total,
            ))
        })
        .collect();
    let doomed_addr = doomed.addr();
    wait_for(Duration::from_secs(10), "the subscribers in place", || {
        metric_value(doomed_addr, "herald_subscriptions") == Some(3.0)
    });
    let progress = Arc::new(AtomicU64::new(0));
    let publishing = tokio::spawn(publish_steadily(
        publisher.addr(),
        channel.clone(),
        total as u64,
        progress.clone(),
    ));
    while progress.load(Ordering::Relaxed) < total as u64 / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    doomed.signal("KILL");
    assert!(doomed.wait_exit(Duration::from_secs(5)).is_some());
    let steady = publishing.await.expect("publisher");
    assert!(steady.refused.is_empty(), "a node's death refuses nothing");
    let acked: Vec<(u64, String)> = steady.acked.into_iter().map(|(s, d, _)| (s, d)).collect();
    for (i, subscriber) in subscribers.into_iter().enumerate() {
        let got = subscriber.await.expect("subscriber");
        assert_eq!(got, acked, "subscriber {i}: every message once, in order");
    }
}

/// `/healthz` and `/metrics` count the masters serving slots and those answering the
/// probe. A master whose replica is gone first stays listed with its slots when it dies
/// too (nobody can take them over): the node keeps answering 200 for the other slots and
/// says 2 of 3 masters answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_counts_the_masters_that_answer() {
    let mut cluster = RedisCluster::start("cluster-health");
    let node = herald(&cluster, &[]);
    let masters = |node: &Server| {
        let health = HttpConn::connect(node.addr()).get("/healthz", RECV_TIMEOUT);
        let body = health.json();
        (
            health.status,
            body["redis_masters"].as_u64(),
            body["redis_masters_answering"].as_u64(),
        )
    };
    wait_for(Duration::from_secs(15), "a probe of every master", || {
        masters(&node) == (200, Some(3), Some(3))
    });
    let master = cluster.masters()[0];
    let replica = cluster.replica_of(master);
    cluster.kill(replica);
    cluster.kill(master);
    wait_for(Duration::from_secs(20), "2 of 3 masters answering", || {
        masters(&node) == (200, Some(3), Some(2))
    });
    assert_eq!(metric_value(node.addr(), "herald_redis_masters"), Some(3.0));
    assert_eq!(
        metric_value(node.addr(), "herald_redis_masters_answering"),
        Some(2.0)
    );
}

/// `expect_seq` and `recovery = "latest"` (the built-in `state.` namespace) on a Redis
/// Cluster: the check runs in the sharded ordering script, the latest value reaches a
/// subscriber without `since` on the other node, and the stream keeps no TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_seq_and_latest_recovery_work_on_a_redis_cluster() {
    let cluster = RedisCluster::start("cluster-state");
    let a = herald(&cluster, &["--history-ttl-ms", "300"]);
    let b = herald(&cluster, &["--history-ttl-ms", "300"]);
    let channel = "state.cluster";
    let mut ws = connect_ws(a.addr()).await;
    for (data, expect, id) in [(1, 0, 1), (2, 0, 2), (2, 1, 3)] {
        let publish =
            json!({"type":"publish","channel":channel,"data":data,"expect_seq":expect,"id":id});
        send_json(&mut ws, &publish).await;
        let reply = recv_json(&mut ws).await;
        match id {
            2 => assert_eq!(
                (reply["code"].as_str(), reply["seq"].as_u64()),
                (Some("conflict"), Some(1)),
                "{reply}"
            ),
            _ => assert_eq!(
                (reply["type"].as_str(), reply["seq"].as_u64()),
                (Some("ack"), Some(expect + 1)),
                "{reply}"
            ),
        }
    }
    // Past the history TTL: the latest value is still there, on the other node.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut fresh = connect_ws(b.addr()).await;
    send_json(
        &mut fresh,
        &json!({"type":"subscribe","channel":channel,"id":1}),
    )
    .await;
    let (seq, data, _) = recv_message(&mut fresh, channel).await;
    assert_eq!((seq, data), (2, json!(2)));
    let subscribed = recv_json(&mut fresh).await;
    assert_eq!(
        (subscribed["type"].as_str(), subscribed["seq"].as_u64()),
        (Some("subscribed"), Some(2))
    );
    let owner = cluster.owner(channel);
    let ttl = support_redis_cluster::redis_cli(
        &[
            "-p",
            &owner.to_string(),
            "PTTL",
            &format!("herald:{{{channel}}}:stream"),
        ],
        Duration::from_secs(5),
    );
    assert_eq!(ttl.trim(), "-1", "the latest value's stream has no TTL");
    for mut node in [a, b] {
        node.assert_healthy();
    }
}
