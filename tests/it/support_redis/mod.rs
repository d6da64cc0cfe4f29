//! A `redis-server` of our own per test, on a free loopback port, killed on drop: the
//! cluster and state tests' Redis. Missing, a test fails rather than skips.

#![allow(dead_code)] // each test file uses part of it

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` of our own, killed on drop.
pub(crate) struct Redis {
    child: Option<Child>,
    pub(crate) port: u16,
    /// Where an append-only file is kept, when the data must survive a restart.
    dir: Option<PathBuf>,
}

pub(crate) fn redis_server_binary() -> Option<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("redis-server"))
        .find(|p| p.is_file())
}

/// The redis-server binary. Missing, the test fails: a cluster test that skips would
/// count as passed without having checked anything.
pub(crate) fn require_redis() -> PathBuf {
    redis_server_binary().unwrap_or_else(|| {
        panic!(
            "redis-server not found: the cluster tests need it (Debian package redis-server, which tests/run.sh installs); to run the other tests without it, leave those files out (cargo test --test it -- --skip cluster:: --skip state::)"
        )
    })
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Redis {
    /// Memory only: `--save "" --appendonly no`.
    pub(crate) fn start(binary: &PathBuf) -> Self {
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
    pub(crate) fn start_persistent(binary: &PathBuf, name: &str) -> Self {
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

    /// Not started yet (a node that must start while Redis is down); [`Redis::spawn`]
    /// starts it.
    pub(crate) fn unstarted() -> Self {
        Self {
            child: None,
            port: free_port(),
            dir: None,
        }
    }

    pub(crate) fn spawn(&mut self, binary: &PathBuf) {
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
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Ready once the server on the port is this child: the port was free when picked,
        // but another test process may have started its own Redis there meanwhile, and a
        // node of this test must never talk to that one.
        while !self.answers_as(pid) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "redis-server on port {} exited with {status} (port taken?)",
                    self.port
                );
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// Whether the Redis answering on the port is process `pid`.
    pub(crate) fn answers_as(&self, pid: u32) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"INFO server\r\n").is_err() {
            return false;
        }
        let wanted = format!("process_id:{pid}\r\n");
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&reply);
            if let Some(at) = text.find("process_id:")
                && text[at..].contains('\n')
            {
                return text[at..].starts_with(&wanted);
            }
        }
        false
    }

    /// Runs one command over RESP and returns the raw reply.
    pub(crate) fn command(&self, args: &[&str]) -> String {
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
    pub(crate) fn nodes_subscribed(&self, channel: &str) -> u32 {
        let reply = self.command(&["PUBSUB", "NUMSUB", &format!("herald:{{{channel}}}")]);
        let count = reply.lines().last().expect("NUMSUB reply");
        count.trim_start_matches(':').parse().expect("NUMSUB count")
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends `signal` (`STOP`, `CONT`) to the running redis-server.
    pub(crate) fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis running").id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// SIGKILL: the harshest stop; only what the append-only file holds survives.
    pub(crate) fn kill(&mut self) {
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

/// Waits (up to 10 s) until the node at `addr` says on `/healthz` that its Redis link is
/// up: `listening on` comes before it.
pub(crate) fn wait_redis_up(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health =
            crate::support_http::HttpConn::connect(addr).get("/healthz", Duration::from_secs(5));
        if health.status == 200 && health.json()["redis"] == "up" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "redis link not up: {}",
            health.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
