//! Worker processes: a run spread over several `herald-bench` processes (each holds what
//! one process's open-file limit allows), told what to do on stdin and reporting on stdout
//! as JSON lines; [`Fleet`] starts and steers them, [`run_worker`] is their side.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufRead as _, Write as _};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::load::{
    ConnState, Engine, Failure, Handler, SPARE_FDS, Target, field_u64, find, io_reason, push_text,
    raise_nofile_limit,
};
use crate::message::{Delivery, Order, SEQ_MARKER, Template, parse_message_data};
use crate::source::{Sources, Spread, SpreadReport, port_budget};
use crate::stats::{
    Hist, Timeline, encode_histogram, monotonic_ns, new_histogram, sample_pids, self_cpu_ns,
};

/// What a worker process is told to do, on its first stdin line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WorkerConfig {
    pub(crate) url: String,
    /// This worker's number, 0-based, and how many there are: it owns the connections
    /// `index, index + workers, ...` of `0..conns`.
    pub(crate) index: usize,
    pub(crate) workers: usize,
    pub(crate) conns: usize,
    pub(crate) channels: Vec<String>,
    /// `--source-ips`, round-robin; empty: the kernel chooses, or with `spread` the
    /// worker spreads over loopback addresses by itself ([`Spread`]).
    pub(crate) source_ips: Vec<Ipv4Addr>,
    #[serde(default)]
    pub(crate) spread: bool,
    /// New connections per second for this worker; 0 = unlimited.
    pub(crate) connect_rate: f64,
    pub(crate) connect_retries: u32,
    pub(crate) connect_timeout_ms: u64,
    /// Largest number of connections between connect and subscribed at once.
    pub(crate) max_in_flight: usize,
    /// Subscribe template; None leaves the connections idle once open.
    pub(crate) subscribe_template: Option<String>,
    /// Text that marks the reply confirming a subscription; empty = don't wait for one.
    pub(crate) subscribe_reply: String,
    /// Offer permessage-deflate and inflate what arrives compressed.
    #[serde(default)]
    pub(crate) deflate: bool,
    /// Accept any TLS certificate (wss:// to a server with a self-signed one).
    #[serde(default)]
    pub(crate) insecure: bool,
}

/// Coordinator -> worker, one JSON line each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub(crate) enum Command {
    /// The measured phase starts; timeline buckets count from `t0_ns`.
    Measure { t0_ns: u64 },
    /// Report and exit.
    Stop,
}

/// Connection outcome of a worker's ramp.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Ready {
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) retries: u64,
    pub(crate) failures: BTreeMap<String, u64>,
    /// Confirmed subscriptions per channel index.
    pub(crate) subs_per_channel: Vec<u64>,
    /// How the connections were spread over source addresses, when the worker chose.
    #[serde(default)]
    pub(crate) spread: Option<SpreadReport>,
}

/// A worker's measurements at the end.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Done {
    pub(crate) received: u64,
    pub(crate) duplicated: u64,
    pub(crate) out_of_order: u64,
    /// Data frames that carried no benchmark message.
    pub(crate) other_frames: u64,
    /// Subscribed connections that closed before the end, by reason.
    pub(crate) disconnected: BTreeMap<String, u64>,
    pub(crate) first_recv_ns: u64,
    pub(crate) last_recv_ns: u64,
    /// CPU used by the worker between `Measure` and `Stop`.
    pub(crate) cpu_ns: u64,
    /// Peak RSS of the worker, bytes.
    pub(crate) rss_bytes: u64,
    /// Bytes read from the sockets between `Measure` and `Stop` (what crossed the wire).
    #[serde(default)]
    pub(crate) bytes_read: u64,
    pub(crate) histogram: String,
    pub(crate) timeline: Vec<String>,
}

/// Worker -> coordinator, one JSON line each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub(crate) enum Report {
    Progress {
        opened: u64,
        failed: u64,
        received: u64,
    },
    Ready(Ready),
    Done(Box<Done>),
    /// The worker hit an error and exits.
    Error {
        message: String,
    },
}

/// Per-connection state of a worker.
#[derive(Debug, Clone, Default)]
struct Track {
    channel: u32,
    attempts: u32,
    /// Resolved: subscribed (or open, for idle connections), or given up.
    resolved: bool,
    ok: bool,
    /// The source address slot of the current attempt, when spread.
    slot: Option<usize>,
    base_seq: Option<u64>,
    order: Order,
}

/// The worker's [`Handler`]: subscribes, then checks and times every delivery.
#[derive(Debug)]
struct Subscriber {
    config: WorkerConfig,
    template: Option<Template>,
    sources: Sources,
    tracks: Vec<Track>,
    retry: VecDeque<(usize, u64)>,
    in_flight: usize,
    ready: Ready,
    done: Done,
    opened: u64,
    t0_ns: Option<u64>,
    hist: Hist,
    timeline: Timeline,
}

impl Subscriber {
    fn global_id(&self, local: usize) -> usize {
        self.config.index + local * self.config.workers
    }

    fn resolve(&mut self, local: usize, ok: bool) {
        let track = &mut self.tracks[local];
        if track.resolved {
            return;
        }
        track.resolved = true;
        track.ok = ok;
        self.in_flight -= 1;
        if ok {
            self.ready.ok += 1;
            self.ready.subs_per_channel[track.channel as usize] += 1;
        } else {
            self.ready.failed += 1;
        }
    }

    /// A connection attempt failed before it was resolved: retry or give up.
    fn attempt_failed(&mut self, local: usize, reason: String) {
        let track = &mut self.tracks[local];
        track.attempts += 1;
        if track.attempts <= self.config.connect_retries {
            self.ready.retries += 1;
            self.in_flight -= 1;
            let backoff_ns = 50_000_000 * u64::from(track.attempts);
            self.retry.push_back((local, monotonic_ns() + backoff_ns));
        } else {
            *self.ready.failures.entry(reason).or_default() += 1;
            self.resolve(local, false);
        }
    }

    fn deliver(&mut self, local: usize, payload: &[u8], recv_ns: u64) {
        let Some((k, scheduled_ns)) = parse_message_data(payload) else {
            self.done.other_frames += 1;
            return;
        };
        let track = &mut self.tracks[local];
        let index = match (track.base_seq, field_u64(payload, SEQ_MARKER)) {
            (Some(base), Some(seq)) if seq > base => seq - base,
            (Some(_), Some(_)) => {
                self.done.other_frames += 1;
                return;
            }
            _ => k / self.config.channels.len() as u64 + 1,
        };
        match track.order.record(index) {
            Delivery::New => {}
            Delivery::OutOfOrder => self.done.out_of_order += 1,
            Delivery::Duplicate => {
                self.done.duplicated += 1;
                return;
            }
        }
        self.done.received += 1;
        if self.done.first_recv_ns == 0 {
            self.done.first_recv_ns = recv_ns;
        }
        self.done.last_recv_ns = recv_ns;
        let latency_us = recv_ns.saturating_sub(scheduled_ns) / 1000;
        self.hist.saturating_record(latency_us);
        let t0 = self.t0_ns.unwrap_or(recv_ns);
        self.timeline.record(recv_ns.saturating_sub(t0), latency_us);
    }
}

impl Handler for Subscriber {
    fn on_open(&mut self, id: usize, out: &mut Vec<u8>) {
        self.opened += 1;
        if let (Sources::Spread(spread), Some(slot)) = (&mut self.sources, self.tracks[id].slot) {
            spread.opened(slot);
        }
        let Some(template) = &self.template else {
            return self.resolve(id, true);
        };
        let channel = &self.config.channels[self.tracks[id].channel as usize];
        let request_id = self.global_id(id) as u64 + 1;
        push_text(out, &template.render(channel, b"", request_id));
        if self.config.subscribe_reply.is_empty() {
            self.resolve(id, true);
        }
    }

    fn on_message(&mut self, id: usize, payload: &[u8], recv_ns: u64, _out: &mut Vec<u8>) {
        let track = &mut self.tracks[id];
        if track.resolved {
            if track.ok {
                self.deliver(id, payload, recv_ns);
            }
            return;
        }
        if find(payload, self.config.subscribe_reply.as_bytes()).is_some() {
            track.base_seq = field_u64(payload, SEQ_MARKER);
            self.resolve(id, true);
        } else if find(payload, b"\"type\":\"error\"").is_some() {
            let reason = format!("subscribe error: {}", String::from_utf8_lossy(payload));
            *self.ready.failures.entry(reason).or_default() += 1;
            self.resolve(id, false);
        } else {
            self.done.other_frames += 1;
        }
    }

    fn on_close(&mut self, id: usize, state: ConnState, failure: Failure) {
        let track = &mut self.tracks[id];
        let slot = track.slot.take();
        if let (Sources::Spread(spread), Some(slot)) = (&mut self.sources, slot) {
            spread.release(slot, state == ConnState::Open);
            let per_address = matches!(&failure, Failure::Refused(r) if r.is_per_address());
            if !track.resolved && per_address && spread.refused(slot) {
                // Not a failure: the address is full, the next one takes the connection.
                self.in_flight -= 1;
                self.retry.push_front((id, 0));
                return;
            }
        }
        if !track.resolved {
            self.attempt_failed(id, failure.to_string());
        } else if track.ok {
            *self
                .done
                .disconnected
                .entry(failure.to_string())
                .or_default() += 1;
        }
    }
}

/// Runs a worker: reads its [`WorkerConfig`] and commands on stdin, writes [`Report`] lines on
/// stdout, exits after `Stop` or when stdin closes.
///
/// # Errors
/// A bad configuration or an epoll failure (also reported as [`Report::Error`]).
pub(crate) fn run_worker() -> Result<()> {
    let result = worker_main();
    if let Err(error) = &result {
        emit(&Report::Error {
            message: format!("{error:#}"),
        });
    }
    result
}

fn emit(report: &Report) {
    let mut line = serde_json::to_string(report).expect("reports serialise");
    line.push('\n');
    let mut stdout = io::stdout().lock();
    let _ = stdout.write_all(line.as_bytes());
    let _ = stdout.flush();
}

fn worker_main() -> Result<()> {
    let limit = raise_nofile_limit();
    let mut stdin = io::stdin().lock();
    let mut line = String::new();
    io::BufRead::read_line(&mut stdin, &mut line).context("reading worker config")?;
    let config: WorkerConfig = serde_json::from_str(&line).context("parsing worker config")?;
    drop(stdin);
    let local_conns = (config.conns + config.workers - 1 - config.index) / config.workers;
    if local_conns as u64 + SPARE_FDS > limit {
        bail!(
            "worker {} would hold {local_conns} connections but may open only {limit} files: \
             use more --procs",
            config.index
        );
    }
    let target = Target::parse(&config.url)?;
    let mut engine = Engine::new(target, local_conns, config.insecure)?;
    if config.deflate {
        engine.offer_deflate();
    }
    let waker = engine.waker()?;
    let (commands_tx, commands) = mpsc::channel();
    std::thread::spawn(move || {
        for line in io::stdin().lines() {
            let Ok(line) = line else { break };
            let Ok(command) = serde_json::from_str::<Command>(&line) else {
                continue;
            };
            if commands_tx.send(command).is_err() {
                return;
            }
            let _ = waker.wake();
        }
        // stdin closed: the coordinator is gone.
        let _ = commands_tx.send(Command::Stop);
        let _ = waker.wake();
    });

    let channels = config.channels.len();
    let tracks = (0..local_conns)
        .map(|local| Track {
            channel: ((config.index + local * config.workers) % channels) as u32,
            ..Track::default()
        })
        .collect();
    let sources = if !config.source_ips.is_empty() {
        Sources::List(config.source_ips.clone())
    } else if config.spread {
        Sources::Spread(Spread::new(config.index, config.workers, port_budget()))
    } else {
        Sources::Kernel
    };
    let mut sub = Subscriber {
        template: config.subscribe_template.as_deref().map(Template::parse),
        sources,
        tracks,
        retry: VecDeque::new(),
        in_flight: 0,
        ready: Ready {
            subs_per_channel: vec![0; channels],
            ..Ready::default()
        },
        done: Done::default(),
        opened: 0,
        t0_ns: None,
        hist: new_histogram(),
        timeline: Timeline::default(),
        config,
    };

    let started_ns = monotonic_ns();
    let timeout_ns = sub.config.connect_timeout_ms * 1_000_000;
    let mut next_new = 0usize;
    let mut starts = 0u64;
    let mut ready_sent = false;
    let mut last_progress = started_ns;
    let mut last_expire = started_ns;
    let mut measure_cpu = 0;
    let mut measure_bytes = 0;
    loop {
        let now = monotonic_ns();
        // The ramp: retries that are due first, then new connections, at the bounded rate.
        let allowed = if sub.config.connect_rate > 0.0 {
            ((now - started_ns) as f64 / 1e9 * sub.config.connect_rate) as u64 + 1
        } else {
            u64::MAX
        };
        while starts < allowed && sub.in_flight < sub.config.max_in_flight {
            let local = match sub.retry.front() {
                Some(&(local, due)) if due <= now => {
                    sub.retry.pop_front();
                    local
                }
                _ if next_new < local_conns => {
                    next_new += 1;
                    next_new - 1
                }
                _ => break,
            };
            starts += 1;
            sub.in_flight += 1;
            let (source, slot) = sub.sources.take(sub.global_id(local));
            if let Err(error) = engine.start(local, source) {
                if let (Sources::Spread(spread), Some(slot)) = (&mut sub.sources, slot) {
                    spread.release(slot, false);
                }
                sub.attempt_failed(local, io_reason(&error));
            } else {
                sub.tracks[local].slot = slot;
            }
        }
        let ramping = !ready_sent;
        engine.turn(
            &mut sub,
            Duration::from_millis(if ramping { 5 } else { 100 }),
        )?;
        let now = monotonic_ns();
        if ramping && now - last_expire > 100_000_000 {
            last_expire = now;
            engine.expire(timeout_ns, &mut sub);
        }
        if !ready_sent && (sub.ready.ok + sub.ready.failed) as usize == local_conns {
            ready_sent = true;
            if let Sources::Spread(spread) = &sub.sources {
                sub.ready.spread = spread.report();
            }
            emit(&Report::Ready(sub.ready.clone()));
        }
        if now - last_progress > 500_000_000 {
            last_progress = now;
            emit(&Report::Progress {
                opened: sub.opened,
                failed: sub.ready.failed,
                received: sub.done.received,
            });
        }
        while let Ok(command) = commands.try_recv() {
            match command {
                Command::Measure { t0_ns } => {
                    sub.t0_ns = Some(t0_ns);
                    measure_cpu = self_cpu_ns();
                    measure_bytes = engine.bytes_read;
                }
                Command::Stop => {
                    let mut done = std::mem::take(&mut sub.done);
                    done.cpu_ns = self_cpu_ns().saturating_sub(measure_cpu);
                    done.bytes_read = engine.bytes_read - measure_bytes;
                    done.rss_bytes = sample_pids(&[std::process::id()])
                        .map(|sample| sample.rss_bytes)
                        .unwrap_or(0);
                    done.histogram = encode_histogram(&sub.hist);
                    done.timeline = sub.timeline.encode();
                    emit(&Report::Done(Box::new(done)));
                    engine.close_all();
                    return Ok(());
                }
            }
        }
    }
}

/// The coordinator's handle on its worker processes.
#[derive(Debug)]
pub(crate) struct Fleet {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    reports: mpsc::Receiver<(usize, Report)>,
}

impl Fleet {
    /// Spawns one worker per config (this executable, hidden `worker` subcommand).
    ///
    /// # Errors
    /// The executable cannot be found or started.
    pub(crate) fn spawn(configs: &[WorkerConfig]) -> Result<Self> {
        let exe = std::env::current_exe().context("locating herald-bench itself")?;
        let (tx, reports) = mpsc::channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for (index, config) in configs.iter().enumerate() {
            let mut child = std::process::Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting worker {index}"))?;
            let mut stdin = child.stdin.take().expect("piped");
            let stdout = child.stdout.take().expect("piped");
            let mut line = serde_json::to_string(config)?;
            line.push('\n');
            stdin.write_all(line.as_bytes())?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut finished = false;
                for line in io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let report =
                        serde_json::from_str(&line).unwrap_or_else(|error| Report::Error {
                            message: format!("bad report line {line:?}: {error}"),
                        });
                    finished |= matches!(report, Report::Done(_));
                    if tx.send((index, report)).is_err() {
                        return;
                    }
                }
                if !finished {
                    let message = "worker exited before reporting".to_owned();
                    let _ = tx.send((index, Report::Error { message }));
                }
            });
            children.push(child);
            stdins.push(stdin);
        }
        Ok(Self {
            children,
            stdins,
            reports,
        })
    }

    /// Sends `command` to every worker.
    ///
    /// # Errors
    /// A worker's stdin is closed.
    pub(crate) fn send(&mut self, command: Command) -> Result<()> {
        let mut line = serde_json::to_string(&command)?;
        line.push('\n');
        for (index, stdin) in self.stdins.iter_mut().enumerate() {
            stdin
                .write_all(line.as_bytes())
                .with_context(|| format!("worker {index} is gone"))?;
        }
        Ok(())
    }

    /// The next report from any worker, or None after `timeout`.
    #[must_use]
    pub(crate) fn recv(&self, timeout: Duration) -> Option<(usize, Report)> {
        self.reports.recv_timeout(timeout).ok()
    }

    /// Waits for every worker to exit.
    pub(crate) fn wait(mut self) {
        self.stdins.clear();
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stdins.clear();
        for child in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
