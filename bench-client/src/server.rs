//! The server under test as `sweep` sees it between points: started afresh for each point
//! (`--server-cmd`), or one running server (`--server-pid`) given time to close the
//! previous point's connections and hand their memory back, so that each point's memory
//! per connection counts from what the server holds at that point's start.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::load::Target;
use crate::stats::sample_pids;

/// How long a started server has to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a killed server's listener may take to go.
const LISTENER_GONE_TIMEOUT: Duration = Duration::from_secs(5);

/// A server started for one point; killed when dropped.
#[derive(Debug)]
pub(crate) struct Started {
    child: Child,
    addr: SocketAddr,
}

impl Started {
    /// Runs `command` through `sh -c` (with `exec`, so the server is the process measured)
    /// and waits until `url`'s address accepts TCP connections.
    ///
    /// # Errors
    /// The command cannot start, exits, or does not listen within 20 s.
    pub(crate) fn spawn(command: &str, url: &str) -> Result<Self> {
        let addr = Target::parse(url)?.addr;
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {command}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting --server-cmd {command:?}"))?;
        let mut started = Self { child, addr };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = started.child.try_wait()? {
                bail!("--server-cmd {command:?} exited ({status}); run it by hand to see why");
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(started);
            }
            if Instant::now() > deadline {
                bail!("--server-cmd {command:?} does not accept connections on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[must_use]
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Started {
    /// Kills the server and waits until its address refuses connections: a listener
    /// can outlive its process briefly (an io_uring server's ring, which holds it, is torn
    /// down after the exit), and the next point's server must not share the port with it.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + LISTENER_GONE_TIMEOUT;
        while Instant::now() < deadline
            && TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Open descriptors of `pids`, summed: a server's connections and little else.
///
/// # Errors
/// A pid whose /proc entry cannot be read.
pub(crate) fn open_files(pids: &[u32]) -> Result<usize> {
    pids.iter().try_fold(0, |total, pid| {
        let entries = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("reading /proc/{pid}/fd"))?;
        Ok(total + entries.count())
    })
}

/// A server kept across a sweep's points (`--server-pid`). Closing connections does not
/// give all their memory back (the connection table stays touched, the allocator keeps
/// pages), so a later point reuses what an earlier one left and its own RSS growth would
/// undercount. Each point instead counts from the RSS the server had before the sweep's
/// first point, which holds for a point with at least as many connections as any before
/// it (they reuse what was kept and add the rest); a point with fewer is not measured.
#[derive(Debug)]
pub(crate) struct Reused {
    pids: Vec<u32>,
    files_at_start: usize,
    baseline_rss: Option<u64>,
    peak: usize,
}

/// The longest a point waits for the server to settle.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);

impl Reused {
    /// # Errors
    /// A pid whose /proc entry cannot be read.
    pub(crate) fn new(pids: &[u32]) -> Result<Self> {
        Ok(Self {
            pids: pids.to_vec(),
            files_at_start: open_files(pids)?,
            baseline_rss: None,
            peak: 0,
        })
    }

    /// Waits for the previous point's connections to close, then returns the RSS a point of
    /// `conns` connections counts its memory from, or None when an earlier point held more,
    /// with why.
    ///
    /// # Errors
    /// The server is gone.
    pub(crate) fn before_point(&mut self, conns: usize) -> Result<Result<u64, String>> {
        let settled = settle(&self.pids, self.files_at_start, SETTLE_LIMIT)?;
        if !settled.settled {
            eprintln!(
                "the server did not settle within {:.0} s (connections of the previous point \
                 still open, or RSS still falling)",
                settled.waited.as_secs_f64()
            );
        }
        let baseline = match self.baseline_rss {
            Some(rss) => rss,
            None => *self.baseline_rss.insert(sample_pids(&self.pids)?.rss_bytes),
        };
        let peak = self.peak;
        self.peak = peak.max(conns);
        if conns < peak {
            return Ok(Err(format!(
                "not measured: the server held {peak} connections at an earlier point and \
                 keeps memory they touched (use --server-cmd)"
            )));
        }
        Ok(Ok(baseline))
    }

    /// The descriptors the server held at the start.
    #[must_use]
    pub(crate) fn files_at_start(&self) -> usize {
        self.files_at_start
    }
}

/// When a server holds (nearly) as many files as its RLIMIT_NOFILE allows, it cannot
/// accept more: connections then wait in the listen queue and time out without an answer.
/// Says so, for a run whose connections failed.
#[must_use]
pub(crate) fn file_limit_note(pids: &[u32]) -> Option<String> {
    pids.iter().find_map(|pid| {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
        let soft: usize = limits
            .lines()
            .find(|line| line.starts_with("Max open files"))?
            .split_whitespace()
            .nth(3)?
            .parse()
            .ok()?;
        let open = open_files(&[*pid]).ok()?;
        // A few descriptors short of the limit already stops accepting: listeners, epoll
        // and the accept in flight take their share.
        (open + 16 >= soft).then(|| {
            format!(
                "the server (pid {pid}) holds {open} open files of its limit of {soft} \
                 (RLIMIT_NOFILE): raise it (ulimit -n, LimitNOFILE=) or spread the \
                 connections over more server processes"
            )
        })
    })
}

/// What [`settle`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settled {
    /// Whether the descriptors came back to the sweep's start and RSS stopped falling.
    pub(crate) settled: bool,
    pub(crate) waited: Duration,
}

/// Waits, at most `limit`, until `pids` hold no more descriptors than `files_at_start`
/// (the previous point's connections are closed) and their RSS stops falling (what the
/// allocator frees it has handed back), polling every 250 ms.
///
/// # Errors
/// A pid that is gone.
pub(crate) fn settle(pids: &[u32], files_at_start: usize, limit: Duration) -> Result<Settled> {
    let started = Instant::now();
    let mut last_rss = u64::MAX;
    loop {
        let closed = open_files(pids)? <= files_at_start;
        let rss = sample_pids(pids)?.rss_bytes;
        // Within 64 KiB of the last sample counts as steady: a few pages come and go.
        let steady = rss.saturating_add(64 << 10) >= last_rss;
        if closed && steady {
            return Ok(Settled {
                settled: true,
                waited: started.elapsed(),
            });
        }
        if started.elapsed() >= limit {
            return Ok(Settled {
                settled: false,
                waited: started.elapsed(),
            });
        }
        last_rss = rss;
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_process_settles_and_a_started_server_is_its_own_process() {
        let me = [std::process::id()];
        let files = open_files(&me).unwrap();
        let settled = settle(&me, files + 8, Duration::from_secs(5)).unwrap();
        assert!(settled.settled);
        assert!(settle(&me, 0, Duration::ZERO).is_ok_and(|s| !s.settled));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let server = Started::spawn("sleep 30", &url).unwrap();
        // The shell execs the command: the pid measured becomes the command's own.
        let comm = || std::fs::read_to_string(format!("/proc/{}/comm", server.pid())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while comm().trim() != "sleep" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(comm().trim(), "sleep");
        let pid = server.pid();
        drop(server);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        assert!(Started::spawn("true", "ws://127.0.0.1:9/ws").is_err());
    }

    #[test]
    fn a_process_far_from_its_file_limit_is_not_at_it() {
        assert_eq!(file_limit_note(&[std::process::id()]), None);
    }
}
