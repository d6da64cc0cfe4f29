//! `--max-connections-per-user` across a cluster (issue 16) against a real
//! `redis-server` and three `herald` processes: a user's connections count on every
//! node, the one past the limit is refused 429 on whichever node it asks, a close frees
//! a place on another node, a node killed with `kill -9` stops counting within the
//! stated bound (and, restarted, inherits none of its counts) and one stopped
//! gracefully at once, upgrades racing on two nodes never pass the limit, a Redis flush is
//! written back, a Redis that does not answer leaves each node on its own count, and
//! the same holds on a real Redis Cluster.
//!
//! Each test starts its own `redis-server` on a free port; without it every test fails
//! with a message saying so, never skips.

use crate::support;
use crate::support_http::Response;
use crate::support_redis::{Redis, require_redis, wait_redis_up};
use crate::support_redis_cluster::RedisCluster;

use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const SECRET: &str = "herald-test-secret-0123456789abcdef";
const LIMIT: &str = "2";
/// The bound README states for a dead node's connections (`PRESENCE_TTL`), plus the time
/// one upgrade takes on a busy machine.
const DEAD_NODE_BOUND: Duration = Duration::from_secs(6);
const SLACK: Duration = Duration::from_secs(2);
/// How often each node refreshes its entry and finds its counts gone (`REFRESH_EVERY`).
const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// A node with the per-user limit of [`LIMIT`], once its Redis link is up.
fn node(url: &str) -> Server {
    let server = Server::start(&[
        "--redis",
        url,
        "--jwt-secret",
        SECRET,
        "--max-connections-per-user",
        LIMIT,
    ]);
    wait_redis_up(server.addr());
    server
}

fn cluster(url: &str) -> Vec<Server> {
    (0..3).map(|_| node(url)).collect()
}

fn token(user: &str) -> String {
    fresh_token(SECRET, json!({"sub": user, "channels": ["*"]}))
}

/// An upgrade of `/ws` as `user` on `addr`: the open connection when it was accepted
/// (101), else the refusal read to its close.
fn upgrade_as(addr: SocketAddr, user: &str) -> Result<TcpStream, Response> {
    let request = upgrade_request(&format!("/ws?token={}", token(user)));
    let (mut stream, head) = request_head(addr, request.as_bytes());
    if head.status == 101 {
        return Ok(stream);
    }
    let mut body = head.rest;
    body.extend(assert_closed_within(&mut stream, Duration::from_secs(5)));
    Err(Response {
        status: head.status,
        headers: head.headers,
        body,
    })
}

fn admitted(addr: SocketAddr, user: &str) -> TcpStream {
    upgrade_as(addr, user).unwrap_or_else(|refused| panic!("{user} refused: {refused:?}"))
}

/// The refusal of a user at the limit: the same 429 and message as on one node.
fn assert_refused(addr: SocketAddr, user: &str) {
    let Err(refused) = upgrade_as(addr, user) else {
        panic!("{user} was admitted past the limit on {addr}");
    };
    refused.assert_api_error(429, "too_many_connections");
    assert!(refused.header("Retry-After").is_some(), "{refused:?}");
    let message = refused.json()["message"].as_str().unwrap_or("").to_owned();
    assert!(
        message.contains("this user holds as many connections as it may"),
        "{message}"
    );
}

/// Upgrades as `user` on `addr` until one is accepted; returns it and how long it took.
fn admitted_within(addr: SocketAddr, user: &str, limit: Duration) -> (TcpStream, Duration) {
    let start = Instant::now();
    loop {
        match upgrade_as(addr, user) {
            Ok(stream) => return (stream, start.elapsed()),
            Err(refused) => assert!(
                start.elapsed() < limit,
                "{user} still refused after {limit:?}: {refused:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(server: &Server, name: &str) -> f64 {
    metric_value(server.addr(), name).unwrap_or_else(|| panic!("{name} missing"))
}

#[test]
fn the_limit_spans_the_nodes_and_a_close_frees_a_place_on_another_node() {
    let redis = Redis::start(&require_redis());
    let nodes = cluster(&redis.url());
    let first = admitted(nodes[0].addr(), "ann");
    let _second = admitted(nodes[1].addr(), "ann");
    // The third is refused wherever it asks, the node holding none included.
    assert_refused(nodes[2].addr(), "ann");
    assert_refused(nodes[0].addr(), "ann");
    let _bob = admitted(nodes[2].addr(), "bob");
    assert_eq!(metric(&nodes[2], "herald_redis_user_refusals_total"), 1.0);
    assert_eq!(metric(&nodes[2], "herald_redis_user_admissions_total"), 1.0);
    assert_eq!(metric(&nodes[0], "herald_redis_user_failures_total"), 0.0);

    // A close on node 0 frees a place that node 2 can give.
    drop(first);
    let (third, took) = admitted_within(nodes[2].addr(), "ann", Duration::from_secs(5));
    eprintln!("a place closed on node 0 was free on node 2 after {took:?}");
    assert_refused(nodes[0].addr(), "ann");

    // Redis loses everything: each node writes its counts again at its next refresh,
    // and the limit holds again.
    assert_eq!(redis.command(&["FLUSHALL"]), "+OK\r\n");
    let start = Instant::now();
    loop {
        let keys = redis.command(&["KEYS", "herald:{herald-users}:conns:*"]);
        // Nodes 1 and 2 hold ann's connections (node 2 bob's too).
        if keys.starts_with("*2\r\n") {
            break;
        }
        assert!(
            start.elapsed() < REFRESH_EVERY + SLACK,
            "counts not written again: {keys:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("counts written again {:?} after FLUSHALL", start.elapsed());
    assert_refused(nodes[0].addr(), "ann");
    drop(third);
}

#[test]
fn a_killed_nodes_connections_stop_counting_within_the_bound() {
    let redis = Redis::start(&require_redis());
    let mut nodes = cluster(&redis.url());
    let _held = [
        admitted(nodes[2].addr(), "ann"),
        admitted(nodes[2].addr(), "ann"),
    ];
    assert_refused(nodes[0].addr(), "ann");
    // kill -9: node 2 cannot give its places back; they stop counting in time.
    nodes[2].signal("KILL");
    assert!(nodes[2].wait_exit(Duration::from_secs(5)).is_some());
    let killed = Instant::now();
    // Restarted at once, it is a new incarnation that inherits none of the old counts:
    // once they stop counting, it admits both places itself.
    nodes[2] = node(&redis.url());
    let (_one, _) = admitted_within(nodes[2].addr(), "ann", DEAD_NODE_BOUND + SLACK);
    let took = killed.elapsed();
    eprintln!("a killed node's connections stopped counting after {took:?}");
    assert!(took <= DEAD_NODE_BOUND + SLACK, "{took:?}");
    let _two = admitted(nodes[2].addr(), "ann");
    assert_refused(nodes[1].addr(), "ann");
    // The dead incarnation's hash is gone at the next refresh of a live node: nothing
    // is left per dead node.
    std::thread::sleep(REFRESH_EVERY + Duration::from_millis(500));
    let keys = redis.command(&["KEYS", "herald:{herald-users}:conns:*"]);
    assert!(keys.starts_with("*1\r\n"), "{keys:?}");
}

#[test]
fn a_node_stopped_gracefully_takes_its_counts_out_at_once() {
    let redis = Redis::start(&require_redis());
    let mut nodes: Vec<Server> = (0..2).map(|_| node(&redis.url())).collect();
    let held = [
        admitted(nodes[1].addr(), "ann"),
        admitted(nodes[1].addr(), "ann"),
    ];
    assert_refused(nodes[0].addr(), "ann");
    nodes[1].signal("TERM");
    drop(held);
    assert!(nodes[1].wait_exit(Duration::from_secs(15)).is_some());
    // Not lapsed in 6 s: gone from the live nodes, its hash removed, as it stopped.
    let live = redis.command(&["ZCARD", "herald:{herald-users}:nodes"]);
    assert_eq!(live, ":1\r\n", "only node 0 is live");
    let keys = redis.command(&["KEYS", "herald:{herald-users}:conns:*"]);
    assert_eq!(keys, "*0\r\n");
    let _both = [
        admitted(nodes[0].addr(), "ann"),
        admitted(nodes[0].addr(), "ann"),
    ];
}

#[test]
fn upgrades_racing_on_two_nodes_never_pass_the_limit() {
    let redis = Redis::start(&require_redis());
    let nodes = cluster(&redis.url());
    let addrs = [nodes[0].addr(), nodes[1].addr()];
    const PER_NODE: usize = 6;
    for round in 0..5 {
        let user = format!("racer{round}");
        let barrier = Arc::new(Barrier::new(2 * PER_NODE));
        let racers: Vec<_> = (0..2 * PER_NODE)
            .map(|i| {
                let (barrier, user, addr) = (barrier.clone(), user.clone(), addrs[i % 2]);
                std::thread::spawn(move || {
                    barrier.wait();
                    upgrade_as(addr, &user)
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        let accepted = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(
            accepted, 2,
            "round {round}: {accepted} upgrades answered 101"
        );
        for refused in results.iter().filter_map(|r| r.as_ref().err()) {
            refused.assert_api_error(429, "too_many_connections");
        }
    }
    let refusals: f64 = nodes[..2]
        .iter()
        .map(|n| metric(n, "herald_redis_user_refusals_total"))
        .sum();
    let local: f64 = nodes[..2]
        .iter()
        .map(|n| metric(n, "herald_redis_user_admissions_total"))
        .sum();
    assert_eq!(local, 10.0, "two admissions a round, each checked in redis");
    assert!(
        refusals >= 1.0,
        "some refusals came from the cluster-wide count"
    );
}

#[test]
fn while_redis_is_down_each_node_counts_alone() {
    let mut redis = Redis::start(&require_redis());
    let nodes: Vec<Server> = (0..2).map(|_| node(&redis.url())).collect();
    let _held = admitted(nodes[0].addr(), "ann");
    redis.kill();
    // The node-local count still refuses a third on one node...
    let _second = admitted(nodes[0].addr(), "ann");
    assert_refused(nodes[0].addr(), "ann");
    // ...and the other node admits on its own count, counted as a failure.
    let _third = admitted(nodes[1].addr(), "ann");
    assert!(metric(&nodes[1], "herald_redis_user_failures_total") >= 1.0);
}

#[test]
fn on_a_redis_cluster_the_limit_spans_the_nodes() {
    let redis = RedisCluster::start("user-limit");
    let nodes = cluster(&redis.seeds());
    let first = admitted(nodes[0].addr(), "ann");
    let _second = admitted(nodes[1].addr(), "ann");
    assert_refused(nodes[2].addr(), "ann");
    drop(first);
    let (_third, _) = admitted_within(nodes[2].addr(), "ann", Duration::from_secs(5));
    assert_refused(nodes[0].addr(), "ann");
    // Refused once before the close, and while it travelled.
    assert!(metric(&nodes[2], "herald_redis_user_refusals_total") >= 1.0);
    assert_eq!(metric(&nodes[0], "herald_redis_user_failures_total"), 0.0);
}
