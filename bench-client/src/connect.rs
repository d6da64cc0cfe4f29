//! `connect`: opens idle (optionally subscribed) connections, holds them, and reports how fast
//! they were accepted, how many failed, and what they cost the server in memory.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::fanout::{
    ConnectSummary, HERALD_SUBSCRIBE, LoadArgs, OutputArgs, connect_fleet, per, worker_configs,
};
use crate::stats::{format_table, sample_pids};
use crate::worker::{Command, Report};

/// `herald-bench connect`.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub(crate) struct ConnectArgs {
    /// WebSocket URL (ws://, or wss:// for TLS; --insecure for a self-signed certificate).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub(crate) url: String,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) conns: usize,
    /// Seconds to hold them open once all are connected.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) hold: f64,
    /// Also subscribe each connection (round-robin over --channels), waiting for the reply.
    #[arg(long)]
    pub(crate) subscribe: bool,
    /// Channels for --subscribe.
    #[arg(long, default_value_t = 1)]
    pub(crate) channels: usize,
    /// Channel names are PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "bench")]
    pub(crate) channel_prefix: String,
    /// Subscribe message for --subscribe; `{channel}` and `{id}` are filled in.
    #[arg(long, default_value = HERALD_SUBSCRIBE)]
    pub(crate) subscribe_template: String,
    /// Text in the reply that confirms a subscription; empty = don't wait for one.
    #[arg(long, default_value = r#""type":"subscribed""#)]
    pub(crate) subscribe_reply: String,
    /// Server process to read RSS (and CPU) of (repeatable).
    #[arg(long = "server-pid")]
    pub(crate) server_pid: Vec<u32>,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) load: LoadArgs,
    #[command(flatten)]
    #[serde(skip)]
    pub(crate) output: OutputArgs,
}

/// Server memory and CPU around the connect phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ConnectServer {
    pub(crate) pids: Vec<u32>,
    pub(crate) rss_bytes_before: u64,
    pub(crate) rss_bytes_after_connect: u64,
    pub(crate) rss_bytes_after_hold: u64,
    /// (RSS after connecting − before) / connections.
    pub(crate) rss_bytes_per_conn: f64,
    /// Server CPU spent accepting (and subscribing) per connection.
    pub(crate) cpu_ns_per_conn: f64,
}

/// The `--json` output of `connect`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ConnectReport {
    pub(crate) mode: String,
    pub(crate) config: serde_json::Value,
    pub(crate) connect: ConnectSummary,
    pub(crate) held_seconds: f64,
    /// Connections the server closed while they were held, by reason.
    pub(crate) disconnected: BTreeMap<String, u64>,
    pub(crate) server: Option<ConnectServer>,
    pub(crate) client_rss_bytes_per_conn: f64,
}

/// Runs `connect` and prints the result.
///
/// # Errors
/// Bad arguments or failing workers.
pub(crate) fn run(args: &ConnectArgs) -> Result<()> {
    if args.conns == 0 || args.channels == 0 {
        bail!("--conns and --channels must be positive");
    }
    let channels: Vec<String> = (0..args.channels)
        .map(|c| format!("{}-{c}", args.channel_prefix))
        .collect();
    let subscribe = args.subscribe.then_some((
        args.subscribe_template.as_str(),
        args.subscribe_reply.as_str(),
    ));
    let configs = worker_configs(&args.url, args.conns, &args.load, &channels, subscribe)?;
    let sample = || -> Result<Option<_>> {
        if args.server_pid.is_empty() {
            Ok(None)
        } else {
            sample_pids(&args.server_pid).map(Some)
        }
    };
    let before = sample()?;
    let (mut fleet, connect, _) = connect_fleet(&configs, args.output.quiet)?;
    let connected = sample()?;
    if !args.output.quiet {
        eprintln!(
            "connected {} ({} failed) in {:.2} s; holding for {} s",
            connect.ok, connect.failed, connect.seconds, args.hold
        );
    }
    let hold_until = Instant::now() + Duration::from_secs_f64(args.hold);
    while Instant::now() < hold_until {
        if let Some((index, Report::Error { message })) = fleet.recv(Duration::from_millis(200)) {
            bail!("worker {index}: {message}");
        }
    }
    let held = sample()?;
    fleet.send(Command::Stop)?;
    let mut disconnected = BTreeMap::new();
    let mut client_rss_bytes_per_conn: f64 = 0.0;
    let mut done = 0;
    while done < configs.len() {
        match fleet.recv(Duration::from_secs(30)) {
            Some((index, Report::Done(report))) => {
                done += 1;
                for (reason, count) in report.disconnected {
                    *disconnected.entry(reason).or_default() += count;
                }
                let held_conns = (args.conns / configs.len()).max(1) as u64;
                client_rss_bytes_per_conn =
                    client_rss_bytes_per_conn.max(per(report.rss_bytes, held_conns));
                let _ = index;
            }
            Some((index, Report::Error { message })) => bail!("worker {index}: {message}"),
            Some(_) => {}
            None => bail!("workers did not report within 30 s"),
        }
    }
    fleet.wait();
    let server = match (before, connected, held) {
        (Some(before), Some(connected), Some(held)) => Some(ConnectServer {
            pids: args.server_pid.clone(),
            rss_bytes_before: before.rss_bytes,
            rss_bytes_after_connect: connected.rss_bytes,
            rss_bytes_after_hold: held.rss_bytes,
            rss_bytes_per_conn: per(
                connected.rss_bytes.saturating_sub(before.rss_bytes),
                connect.ok,
            ),
            cpu_ns_per_conn: per(connected.cpu_ns.saturating_sub(before.cpu_ns), connect.ok),
        }),
        _ => None,
    };
    let report = ConnectReport {
        mode: "connect".to_owned(),
        config: serde_json::to_value(args)?,
        connect,
        held_seconds: args.hold,
        disconnected,
        server,
        client_rss_bytes_per_conn,
    };
    let table = format_connect(&report);
    if let Some(path) = &args.output.report {
        crate::report::write_page(path, "herald-bench connect", &table, &[])?;
    }
    if args.output.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{table}");
    }
    Ok(())
}

/// The human table.
fn format_connect(report: &ConnectReport) -> String {
    let c = &report.connect;
    let mut rows = vec![
        (
            "connect",
            format!(
                "{} ok, {} failed of {} in {:.2} s ({:.0}/s, {} retries)",
                c.ok, c.failed, c.attempted, c.seconds, c.per_second, c.retries
            ),
        ),
        ("held", format!("{} s", report.held_seconds)),
    ];
    if !c.failures.is_empty() {
        rows.push(("failures", format!("{:?}", c.failures)));
    }
    if !report.disconnected.is_empty() {
        rows.push(("dropped", format!("{:?}", report.disconnected)));
    }
    if let Some(server) = &report.server {
        rows.push((
            "server rss",
            format!(
                "{:.0} B/conn ({:.1} MiB before, {:.1} MiB connected, {:.1} MiB after holding)",
                server.rss_bytes_per_conn,
                server.rss_bytes_before as f64 / 1048576.0,
                server.rss_bytes_after_connect as f64 / 1048576.0,
                server.rss_bytes_after_hold as f64 / 1048576.0
            ),
        ));
        rows.push((
            "server cpu",
            format!("{:.0} ns/connection accepted", server.cpu_ns_per_conn),
        ));
    }
    rows.push((
        "client rss",
        format!("{:.0} B/conn", report.client_rss_bytes_per_conn),
    ));
    format_table(
        &format!(
            "connect: {} conns -> {}",
            report.connect.attempted,
            report.config["url"].as_str().unwrap_or("?")
        ),
        &rows,
    )
}
