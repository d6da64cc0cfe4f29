//! `echo`: round-trip latency and throughput on the `/echo` endpoint, closed-loop (each
//! connection sends its next message when the previous one is back) or paced (`--rate`
//! messages/s over all connections, latency counted from the scheduled send time).

use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::fanout::{ClientFigures, ConnectSummary, OutputArgs, per};
use crate::load::{
    ConnState, Engine, Failure, Handler, Target, io_reason, parse_source_ips, push_text,
    raise_nofile_limit,
};
use crate::message::{message_data, parse_message_data};
use crate::stats::{
    CurvePoint, Hist, LatencySummary, Timeline, TimelinePoint, format_table, human_us,
    monotonic_ns, new_histogram, percentile_curve, self_cpu_ns,
};

/// `herald-bench echo`.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub(crate) struct EchoArgs {
    /// WebSocket echo URL (ws://, or wss:// for TLS).
    #[arg(long, default_value = "ws://127.0.0.1:8080/echo")]
    pub(crate) url: String,
    /// Connections (all in this process; each has one message in flight when closed-loop).
    #[arg(long, default_value_t = 10)]
    pub(crate) conns: usize,
    /// Message size in bytes (a JSON text frame, padded).
    #[arg(long, default_value_t = 64)]
    pub(crate) size: usize,
    /// Messages per second over all connections, round-robin; 0 = closed loop.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) rate: f64,
    /// Seconds of measurement.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) duration: f64,
    /// Source addresses to bind before connecting, round-robin: `A-B` (inclusive range) or a
    /// comma-separated list; empty lets the kernel choose (echo's connections are few,
    /// so there is no `auto` spread here).
    #[arg(long, default_value = "")]
    pub(crate) source_ips: String,
    /// Server process to read CPU time of, from /proc, over the measured window
    /// (repeatable).
    #[arg(long = "server-pid")]
    #[serde(default)]
    pub(crate) server_pid: Vec<u32>,
    /// With wss://, accept any server certificate (self-signed test ones).
    #[arg(long)]
    #[serde(default)]
    pub(crate) insecure: bool,
    #[command(flatten)]
    #[serde(skip)]
    pub(crate) output: OutputArgs,
}

/// The `--json` output of `echo`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct EchoReport {
    pub(crate) mode: String,
    pub(crate) config: serde_json::Value,
    pub(crate) connect: ConnectSummary,
    pub(crate) sent: u64,
    pub(crate) received: u64,
    /// Messages sent whose echo never came back.
    pub(crate) missing: u64,
    /// Round trips per second.
    pub(crate) per_second: f64,
    pub(crate) latency_us: LatencySummary,
    pub(crate) timeline: Vec<TimelinePoint>,
    pub(crate) percentile_curve: Vec<CurvePoint>,
    pub(crate) client: ClientFigures,
    /// Server CPU over the measured window (with `--server-pid`).
    pub(crate) server: Option<EchoServerFigures>,
}

/// What the server spent on the measured window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct EchoServerFigures {
    pub(crate) pids: Vec<u32>,
    pub(crate) cpu_ns: u64,
    pub(crate) cpu_ns_per_message: f64,
}

#[derive(Debug)]
struct Echo {
    size: usize,
    closed_loop: bool,
    open: Vec<usize>,
    failures: std::collections::BTreeMap<String, u64>,
    resolved: usize,
    /// Set when measuring: start and end of the sending window.
    t0_ns: Option<u64>,
    end_ns: u64,
    next_k: u64,
    sent: u64,
    received: u64,
    hist: Hist,
    timeline: Timeline,
}

impl Echo {
    fn next_message(&mut self, scheduled_ns: u64) -> Vec<u8> {
        let k = self.next_k;
        self.next_k += 1;
        self.sent += 1;
        message_data(k, scheduled_ns, self.size)
    }
}

impl Handler for Echo {
    fn on_open(&mut self, id: usize, _out: &mut Vec<u8>) {
        self.open.push(id);
        self.resolved += 1;
    }

    fn on_message(&mut self, _id: usize, payload: &[u8], recv_ns: u64, out: &mut Vec<u8>) {
        let Some((_, scheduled_ns)) = parse_message_data(payload) else {
            return;
        };
        let Some(t0) = self.t0_ns else { return };
        self.received += 1;
        let latency_us = recv_ns.saturating_sub(scheduled_ns) / 1000;
        self.hist.saturating_record(latency_us);
        self.timeline.record(recv_ns.saturating_sub(t0), latency_us);
        if self.closed_loop && recv_ns < self.end_ns {
            let now = monotonic_ns();
            let message = self.next_message(now);
            push_text(out, &message);
        }
    }

    fn on_close(&mut self, _id: usize, state: ConnState, failure: Failure) {
        if state != ConnState::Open {
            self.resolved += 1;
        }
        *self.failures.entry(failure.to_string()).or_default() += 1;
    }
}

/// Runs `echo` and prints the result.
///
/// # Errors
/// Bad arguments, no connection, or an epoll failure.
pub(crate) fn run(args: &EchoArgs) -> Result<()> {
    if args.conns == 0 || args.duration <= 0.0 || args.rate < 0.0 {
        bail!("--conns and --duration must be positive and --rate not negative");
    }
    let limit = raise_nofile_limit();
    if args.conns as u64 + crate::load::SPARE_FDS > limit {
        bail!(
            "{} connections exceed the open-file limit of {limit}",
            args.conns
        );
    }
    let sources = parse_source_ips(&args.source_ips)?;
    let mut engine = Engine::new(Target::parse(&args.url)?, args.conns, args.insecure)?;
    let mut echo = Echo {
        size: args.size,
        closed_loop: args.rate == 0.0,
        open: Vec::new(),
        failures: std::collections::BTreeMap::new(),
        resolved: 0,
        t0_ns: None,
        end_ns: 0,
        next_k: 0,
        sent: 0,
        received: 0,
        hist: new_histogram(),
        timeline: Timeline::default(),
    };
    let started = monotonic_ns();
    for id in 0..args.conns {
        let source =
            (!sources.is_empty()).then(|| std::net::IpAddr::V4(sources[id % sources.len()]));
        if let Err(error) = engine.start(id, source) {
            echo.resolved += 1;
            *echo.failures.entry(io_reason(&error)).or_default() += 1;
        }
    }
    while echo.resolved < args.conns {
        engine.turn(&mut echo, Duration::from_millis(10))?;
        engine.expire(10_000_000_000, &mut echo);
    }
    let connect_seconds = (monotonic_ns() - started) as f64 / 1e9;
    let ok = echo.open.len() as u64;
    if ok == 0 {
        bail!("no connection succeeded: {:?}", echo.failures);
    }
    let connect = ConnectSummary {
        attempted: args.conns as u64,
        ok,
        failed: args.conns as u64 - ok,
        seconds: connect_seconds,
        per_second: (ok as f64 / connect_seconds.max(1e-9)).round(),
        retries: 0,
        failures: echo.failures.clone(),
        spread: None,
        server_limit: None,
    };

    if !args.output.quiet {
        eprintln!(
            "connected {ok} in {connect_seconds:.2} s; measuring for {} s",
            args.duration
        );
    }
    let server_before = sample_server_cpu(&args.server_pid)?;
    let cpu_before = self_cpu_ns();
    let t0 = monotonic_ns();
    echo.t0_ns = Some(t0);
    echo.end_ns = t0 + (args.duration * 1e9) as u64;
    if echo.closed_loop {
        for index in 0..echo.open.len() {
            let id = echo.open[index];
            let message = echo.next_message(monotonic_ns());
            let mut frame = Vec::new();
            push_text(&mut frame, &message);
            engine.send(id, &frame, &mut echo);
        }
        while monotonic_ns() < echo.end_ns {
            engine.turn(&mut echo, Duration::from_millis(10))?;
        }
    } else {
        let interval_ns = 1e9 / args.rate;
        let total = (args.rate * args.duration).round() as u64;
        let mut k = 0;
        while k < total {
            let now = monotonic_ns();
            while k < total {
                let scheduled = t0 + (k as f64 * interval_ns) as u64;
                if scheduled > now {
                    break;
                }
                let id = echo.open[(k % echo.open.len() as u64) as usize];
                let message = echo.next_message(scheduled);
                let mut frame = Vec::new();
                push_text(&mut frame, &message);
                engine.send(id, &frame, &mut echo);
                k += 1;
            }
            let next = t0 + (k as f64 * interval_ns) as u64;
            let wait = next.saturating_sub(monotonic_ns()).min(1_000_000);
            engine.turn(&mut echo, Duration::from_nanos(wait))?;
        }
    }
    // Wait for the echoes still in flight.
    let drain_end = monotonic_ns() + 2_000_000_000;
    while echo.received < echo.sent && monotonic_ns() < drain_end {
        engine.turn(&mut echo, Duration::from_millis(10))?;
    }
    let elapsed_s = (monotonic_ns() - t0) as f64 / 1e9;
    let cpu_ns = self_cpu_ns().saturating_sub(cpu_before);
    let server = match (server_before, sample_server_cpu(&args.server_pid)?) {
        (Some(before), Some(after)) => {
            let cpu_ns = after.saturating_sub(before);
            Some(EchoServerFigures {
                pids: args.server_pid.clone(),
                cpu_ns,
                cpu_ns_per_message: per(cpu_ns, echo.received),
            })
        }
        _ => None,
    };
    engine.close_all();

    let report = EchoReport {
        mode: "echo".to_owned(),
        config: serde_json::to_value(args)?,
        connect,
        sent: echo.sent,
        received: echo.received,
        missing: echo.sent.saturating_sub(echo.received),
        per_second: (echo.received as f64 / args.duration.min(elapsed_s)).round(),
        latency_us: LatencySummary::of(&echo.hist),
        timeline: echo.timeline.points(),
        percentile_curve: percentile_curve(&echo.hist),
        client: ClientFigures {
            cpu_ns,
            cpu_ns_per_delivery: per(cpu_ns, echo.received),
            procs: 1,
            rss_bytes_per_conn: 0.0,
            wire_bytes_per_delivery: 0.0,
        },
        server,
    };
    let table = format_echo(&report);
    if let Some(path) = &args.output.report {
        let svgs = crate::report::plots(&[(
            "echo".to_owned(),
            report.percentile_curve.clone(),
            report.timeline.clone(),
        )])?;
        crate::report::write_page(path, "herald-bench echo", &table, &svgs)?;
    }
    if args.output.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{table}");
    }
    Ok(())
}

fn format_echo(report: &EchoReport) -> String {
    let l = &report.latency_us;
    let c = &report.connect;
    format_table(
        &format!(
            "echo: {} conns, {} B, {} -> {}",
            report.config["conns"],
            report.config["size"],
            if report.config["rate"].as_f64() == Some(0.0) {
                "closed loop".to_owned()
            } else {
                format!("{} msg/s", report.config["rate"])
            },
            report.config["url"].as_str().unwrap_or("?")
        ),
        &[
            (
                "connect",
                format!("{} ok, {} failed in {:.2} s", c.ok, c.failed, c.seconds),
            ),
            (
                "round trips",
                format!(
                    "{} sent, {} back, {} missing; {:.0}/s",
                    report.sent, report.received, report.missing, report.per_second
                ),
            ),
            (
                "latency",
                format!(
                    "p50 {}  p90 {}  p99 {}  p99.9 {}  p99.99 {}  max {}",
                    human_us(l.p50),
                    human_us(l.p90),
                    human_us(l.p99),
                    human_us(l.p999),
                    human_us(l.p9999),
                    human_us(l.max)
                ),
            ),
            (
                "client cpu",
                format!("{:.0} ns/round trip", report.client.cpu_ns_per_delivery),
            ),
            (
                "server cpu",
                report.server.as_ref().map_or_else(
                    || "(no --server-pid)".to_owned(),
                    |s| format!("{:.0} ns/message", s.cpu_ns_per_message),
                ),
            ),
        ],
    )
}

/// The servers' summed CPU time, ns (`None` without `--server-pid`).
fn sample_server_cpu(pids: &[u32]) -> Result<Option<u64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    Ok(Some(crate::stats::sample_pids(pids)?.cpu_ns))
}
