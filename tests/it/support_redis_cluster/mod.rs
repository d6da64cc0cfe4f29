//! A Redis Cluster of Debian's `redis-server` for the tests: six servers on loopback
//! ports made three masters with one replica each by `redis-cli --cluster create`,
//! each server under `timeout` so none outlives its test, killed and its files removed
//! on drop.
#![allow(dead_code)]

pub(crate) mod client;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a master may be silent before its replica takes over: short, so a failover
/// fits in the test's time.
const NODE_TIMEOUT_MS: &str = "1000";
/// The longest a test's `redis-server` lives (seconds), whatever happens to the test.
const LIFETIME: &str = "300";

fn binary(name: &str) -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found: the Redis Cluster tests need it (Debian package redis-server, which tests/run.sh installs)"
            )
        })
}

/// Two distinct free ports (a server's and its cluster bus').
fn free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("free port");
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().expect("port").port();
    (port(&a), port(&b))
}

/// One `redis-server` of the cluster.
pub(crate) struct RedisNode {
    pub(crate) port: u16,
    child: Option<Child>,
}

/// Six `redis-server`s made one cluster, killed (and their files removed) on drop.
pub(crate) struct RedisCluster {
    pub(crate) nodes: Vec<RedisNode>,
    dir: PathBuf,
}

/// Runs `redis-cli` with a time limit; its stdout.
pub(crate) fn redis_cli(args: &[&str], limit: Duration) -> String {
    let mut child = Command::new(binary("redis-cli"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run redis-cli");
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("redis-cli status").is_some() {
            let out = child.wait_with_output().expect("redis-cli output");
            return String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("redis-cli {args:?} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl RedisNode {
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        let port = self.port.to_string();
        let mut all = vec!["-h", "127.0.0.1", "-p", &port];
        all.extend_from_slice(args);
        redis_cli(&all, Duration::from_secs(5))
    }

    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl RedisCluster {
    /// Starts six servers and creates the cluster (three masters, one replica each),
    /// ready once every node sees every slot served.
    pub(crate) fn start(name: &str) -> Self {
        let server = binary("redis-server");
        let dir = std::env::temp_dir().join(format!("herald-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..6 {
            let node = cluster.spawn(&server);
            cluster.nodes.push(node);
        }
        let addrs: Vec<String> = cluster.nodes.iter().map(RedisNode::addr).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = redis_cli(&args, Duration::from_secs(30));
        assert!(out.contains("All 16384 slots covered"), "{out}");
        cluster.wait_ok();
        for node in &cluster.nodes {
            wait_for(Duration::from_secs(30), "replicas in sync", || {
                let info = node.cli(&["INFO", "replication"]);
                info.contains("role:master") || info.contains("master_link_status:up")
            });
        }
        cluster
    }

    /// One server, answering. A port picked free may be taken again before the server
    /// binds it (other tests pick ports too): then it exits, and new ports are picked.
    fn spawn(&self, server: &PathBuf) -> RedisNode {
        for _ in 0..5 {
            let (port, bus) = free_ports();
            // Under `timeout`, so a server outlives no test by more than LIFETIME even
            // when the test process is killed before its `Drop` runs.
            let mut child = Command::new("timeout")
                .args(["-s", "KILL", LIFETIME])
                .arg(server)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .args(["--cluster-node-timeout", NODE_TIMEOUT_MS])
                .arg("--cluster-config-file")
                .arg(self.dir.join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(&self.dir)
                .args(["--save", "", "--appendonly", "no"])
                // A replica that has not synced never takes over: sync at once.
                .args(["--repl-diskless-sync-delay", "0"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            let mut node = RedisNode { port, child: None };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().expect("redis-server status").is_some() {
                    break;
                }
                if node.cli(&["PING"]).contains("PONG") {
                    node.child = Some(child);
                    return node;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start on five pairs of free ports");
    }

    /// Waits until every running node says the cluster is ok and every slot is served.
    pub(crate) fn wait_ok(&self) {
        wait_for(
            Duration::from_secs(30),
            "cluster_state:ok everywhere",
            || {
                self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                    let info = n.cli(&["CLUSTER", "INFO"]);
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                })
            },
        );
    }

    pub(crate) fn seeds(&self) -> String {
        let addrs: Vec<String> = self.nodes[..3].iter().map(RedisNode::addr).collect();
        format!("redis+cluster://{}", addrs.join(","))
    }

    fn running(&self) -> &RedisNode {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a running node")
    }

    /// The hash slot of `channel`'s keys.
    pub(crate) fn slot(&self, channel: &str) -> u16 {
        let key = format!("herald:{{{channel}}}");
        let reply = self.running().cli(&["CLUSTER", "KEYSLOT", &key]);
        reply.trim().parse().expect("slot")
    }

    /// The port of the master serving `channel`'s slot, as the cluster sees it now.
    pub(crate) fn owner(&self, channel: &str) -> u16 {
        let slot = self.slot(channel);
        for line in self.running().cli(&["CLUSTER", "NODES"]).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let port = fields[1].split(['@', ':']).nth(1).expect("port");
            for range in &fields[8..] {
                let (from, to) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(from), Ok(to)) = (from.parse::<u16>(), to.parse::<u16>())
                    && (from..=to).contains(&slot)
                {
                    return port.parse().expect("port");
                }
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// The ports of the masters.
    pub(crate) fn masters(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some() && n.cli(&["ROLE"]).starts_with("master"))
            .map(|n| n.port)
            .collect()
    }

    /// The port of the replica of the master on `master`.
    pub(crate) fn replica_of(&self, master: u16) -> u16 {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .find(|n| {
                let role = n.cli(&["ROLE"]);
                let mut lines = role.lines();
                lines.next() == Some("slave") && lines.nth(1) == Some(&master.to_string())
            })
            .map(|n| n.port)
            .expect("a replica of the master")
    }

    /// Moves `slot` from the master on `from` to the one on `to` as `redis-cli
    /// --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE of its keys, then the
    /// new owner announced to every master.
    pub(crate) fn migrate(&self, slot: u16, from: u16, to: u16) {
        let node = |port: u16| self.nodes.iter().find(|n| n.port == port).expect("node");
        let (src, dst) = (node(from), node(to));
        let id = |n: &RedisNode| n.cli(&["CLUSTER", "MYID"]).trim().to_string();
        let (src_id, dst_id) = (id(src), id(dst));
        let slot = slot.to_string();
        let ok = |reply: String| assert!(reply.contains("OK"), "{reply}");
        ok(dst.cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src_id]));
        ok(src.cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst_id]));
        loop {
            let keys = src.cli(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            ok(src.cli(&args));
        }
        // The new owner first, then the old, then the others (as redis-cli does).
        let mut masters = vec![to, from];
        masters.extend(
            self.masters()
                .into_iter()
                .filter(|p| *p != to && *p != from),
        );
        for port in masters {
            ok(node(port).cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id]));
        }
    }

    /// SIGKILL to the server on `port`, unless it is dead already.
    pub(crate) fn kill(&mut self, port: u16) {
        let node = self.nodes.iter().find(|n| n.port == port).expect("node");
        let parent = node.child.as_ref().map(|c| c.id().to_string());
        if parent.is_some_and(|p| !output_of(&["pgrep", "-P", &p]).trim().is_empty()) {
            self.signal(port, "KILL");
        }
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("node");
        if let Some(mut child) = node.child.take() {
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`KILL`, `STOP`) to the server on `port` (the child of its
    /// `timeout`). A stopped server must be killed before the cluster is dropped.
    pub(crate) fn signal(&self, port: u16, signal: &str) {
        let node = self.nodes.iter().find(|n| n.port == port).expect("node");
        let parent = node.child.as_ref().expect("running").id().to_string();
        let server = output_of(&["pgrep", "-P", &parent]);
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(server.trim())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} redis-server {server}");
    }
}

/// Runs a short command; its stdout.
fn output_of(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run command");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            // SIGTERM to `timeout`, which hands it to the server and waits for it.
            if let Some(mut child) = node.child.take() {
                let _ = Command::new("kill").arg(child.id().to_string()).status();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
