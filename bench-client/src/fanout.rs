//! `fanout`: subscribers over many connections and worker processes, one paced publisher,
//! publish→receive latency counted from the scheduled send time, and the loss, duplicate and
//! order checks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::load::{SPARE_FDS, Target, parse_source_ips, raise_nofile_limit};
use crate::publisher::Publisher;
use crate::server::file_limit_note;
use crate::source::SpreadReport;
use crate::stats::{
    CurvePoint, LatencySummary, ProcSample, Timeline, TimelinePoint, decode_histogram, merge,
    monotonic_ns, new_histogram, percentile_curve, sample_pids, self_cpu_ns,
};
use crate::worker::{Command, Fleet, Report, WorkerConfig};

/// Herald's subscribe request.
pub(crate) const HERALD_SUBSCRIBE: &str = r#"{"type":"subscribe","channel":"{channel}","id":{id}}"#;
/// Herald's publish request.
pub(crate) const HERALD_PUBLISH: &str =
    r#"{"type":"publish","channel":"{channel}","data":{data},"id":{id}}"#;

/// How connections are opened: shared by `fanout`, `connect` and `sweep`.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub(crate) struct LoadArgs {
    /// Worker processes to spread the connections over (each holds at most its open-file
    /// hard limit, `ulimit -Hn`, minus a few).
    #[arg(long, default_value_t = 1)]
    pub(crate) procs: usize,
    /// Source addresses to bind before connecting, round-robin: `A-B` (inclusive range) or a
    /// comma-separated list, e.g. 127.0.0.2-127.0.0.250; each gives another ~28k ports.
    /// `auto`: on a loopback server, each worker fills 127.0.0.2 and up one address at a
    /// time, moving on at its share of the ephemeral ports or when the server refuses one
    /// more from an address (its per-address cap), and says so; elsewhere the kernel
    /// chooses, as with an empty list.
    #[arg(long, default_value = "auto")]
    pub(crate) source_ips: String,
    /// New connections per second over all workers (0 = as fast as possible).
    #[arg(long, default_value_t = 5000.0)]
    pub(crate) connect_rate: f64,
    /// Retries per connection after a failed connect, handshake or subscribe; connections
    /// that still fail are counted and reported.
    #[arg(long, default_value_t = 3)]
    pub(crate) connect_retries: u32,
    /// Give up on a connect + handshake after this long (counts as a failure, then retries).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) connect_timeout_ms: u64,
    /// Most connections in progress (connecting, handshaking, subscribing) per worker.
    #[arg(long, default_value_t = 1000)]
    pub(crate) max_in_flight: usize,
    /// Offer permessage-deflate on every connection and inflate compressed messages (the
    /// server must run with --compression shared or per-connection to accept it).
    #[arg(long)]
    #[serde(default)]
    pub(crate) deflate: bool,
    /// With wss:// and https://, accept any server certificate (self-signed test ones);
    /// otherwise it is verified against SSL_CERT_FILE or the system's CA bundle.
    #[arg(long)]
    #[serde(default)]
    pub(crate) insecure: bool,
}

/// Everything about a fan-out run except its size (shared with `sweep`).
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub(crate) struct RunArgs {
    /// WebSocket URL the subscribers connect to (ws://, or wss:// for TLS). A
    /// comma-separated list spreads the worker processes over several servers (a
    /// cluster), round-robin; the publisher uses the first.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub(crate) url: String,
    /// Channels; subscribers are spread round-robin over them and the publisher round-robins.
    #[arg(long, default_value_t = 1)]
    pub(crate) channels: usize,
    /// Channel names are PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "bench")]
    pub(crate) channel_prefix: String,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) duration: f64,
    /// How messages are published: `ws` (a WebSocket publish frame per message) or `http`
    /// (`POST /api/publish` on a keep-alive connection, with `--api-key`: the key the
    /// server was started with, `herald serve --api-key`).
    #[arg(long, value_enum, default_value_t = PublishMode::Ws)]
    pub(crate) publish: PublishMode,
    /// Where to publish; defaults to `--url` for ws and its host with /api/publish for http.
    #[arg(long)]
    pub(crate) publish_url: Option<String>,
    /// API key sent as `Authorization: Bearer` with `--publish http`.
    #[arg(long)]
    pub(crate) api_key: Option<String>,
    /// Subscribe message; `{channel}` and `{id}` are filled in. An empty string subscribes
    /// nobody (for servers that broadcast to every connection).
    #[arg(long, default_value = HERALD_SUBSCRIBE)]
    pub(crate) subscribe_template: String,
    /// Text in the server's reply that confirms a subscription (its `"seq":` becomes the base
    /// of the sequence checks); empty = the server sends no confirmation.
    #[arg(long, default_value = r#""type":"subscribed""#)]
    pub(crate) subscribe_reply: String,
    /// Publish message over ws; `{channel}`, `{data}` (the benchmark's JSON object) and `{id}`
    /// are filled in.
    #[arg(long, default_value = HERALD_PUBLISH)]
    pub(crate) publish_template: String,
    /// Server process to read CPU time and RSS of, from /proc (repeatable).
    #[arg(long = "server-pid")]
    pub(crate) server_pid: Vec<u32>,
    /// After the last publish, wait at most this many seconds for deliveries to arrive (less
    /// when everything has arrived, or nothing more arrives for 2 s). Deliveries that have not
    /// arrived by then count as lost: raise it to tell an overloaded server from a lossy one.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) drain_timeout: f64,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) load: LoadArgs,
}

/// Output options shared by every subcommand.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct OutputArgs {
    /// Print one JSON object on the last line of stdout instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Write a self-contained HTML report with plots to this file.
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub(crate) quiet: bool,
}

fn one() -> u64 {
    1
}

/// When message `k` is due: messages go in groups of `burst` sharing the first one's slot,
/// so the average rate stays `1 / interval`.
pub(crate) fn scheduled_ns(t0: u64, k: u64, interval_ns: f64, burst: u64) -> u64 {
    t0 + ((k - k % burst) as f64 * interval_ns) as u64
}

/// How the publisher publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PublishMode {
    Ws,
    Http,
}

/// `herald-bench fanout`.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub(crate) struct FanoutArgs {
    /// Subscriber connections.
    #[arg(long, default_value_t = 1000)]
    pub(crate) conns: usize,
    /// Messages per second, over all channels.
    #[arg(long, default_value_t = 20.0)]
    pub(crate) rate: f64,
    /// Size of each message's `data` JSON in bytes (padded; at least ~30).
    #[arg(long, default_value_t = 64)]
    pub(crate) size: usize,
    /// Messages published back to back at each scheduled time (`--rate` stays the average
    /// rate), so several frames are pending per subscriber in one server loop turn.
    #[arg(long, default_value_t = 1)]
    #[serde(default = "one")]
    pub(crate) burst: u64,
    /// The server RSS that memory per connection counts from, when not its RSS just
    /// before connecting (a sweep that reuses one server).
    #[arg(skip)]
    #[serde(skip)]
    pub(crate) rss_baseline: Option<u64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) run: RunArgs,
    #[command(flatten)]
    #[serde(skip)]
    pub(crate) output: OutputArgs,
}

/// The connect phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ConnectSummary {
    pub(crate) attempted: u64,
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) seconds: f64,
    pub(crate) per_second: f64,
    pub(crate) retries: u64,
    /// Failed connections by last reason.
    pub(crate) failures: BTreeMap<String, u64>,
    /// How the workers spread the connections over source addresses by themselves.
    #[serde(default)]
    pub(crate) spread: Option<SpreadReport>,
    /// A server limit that explains failed connections with no refusal to read (the
    /// server's open files).
    #[serde(default)]
    pub(crate) server_limit: Option<String>,
}

/// Delivery accounting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Deliveries {
    pub(crate) expected: u64,
    pub(crate) received: u64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) out_of_order: u64,
    pub(crate) per_second: f64,
    /// Subscribed connections that closed during the run, by reason.
    pub(crate) disconnected: BTreeMap<String, u64>,
}

/// Server figures from /proc.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ServerFigures {
    pub(crate) pids: Vec<u32>,
    /// CPU used from the first publish to the end of the drain.
    pub(crate) cpu_ns: u64,
    pub(crate) cpu_ns_per_delivery: f64,
    /// RSS before connecting, after connecting, and after publishing.
    pub(crate) rss_bytes_before: u64,
    pub(crate) rss_bytes_after_connect: u64,
    pub(crate) rss_bytes_after: u64,
    /// (RSS after connecting − before) / connections; 0 when RSS did not grow, with
    /// `rss_note` saying why.
    pub(crate) rss_bytes_per_conn: f64,
    /// Why `rss_bytes_per_conn` is not a measurement, when it is not.
    #[serde(default)]
    pub(crate) rss_note: Option<String>,
}

/// The benchmark's own cost during the publish phase (all its processes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ClientFigures {
    pub(crate) cpu_ns: u64,
    pub(crate) cpu_ns_per_delivery: f64,
    pub(crate) procs: usize,
    /// Largest worker RSS per connection it holds.
    pub(crate) rss_bytes_per_conn: f64,
    /// Bytes the subscribers read from their sockets per delivery, frame headers and
    /// everything else on the connections included.
    #[serde(default)]
    pub(crate) wire_bytes_per_delivery: f64,
}

/// The result of one fan-out run; also the `--json` output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FanoutReport {
    pub(crate) mode: String,
    pub(crate) config: serde_json::Value,
    pub(crate) connect: ConnectSummary,
    pub(crate) published: u64,
    pub(crate) acked: u64,
    /// How far behind its schedule the publisher fell at worst, µs (latency still counts
    /// from the schedule).
    pub(crate) publisher_max_behind_us: u64,
    pub(crate) publish_errors: Vec<String>,
    pub(crate) latency_us: LatencySummary,
    pub(crate) deliveries: Deliveries,
    pub(crate) timeline: Vec<TimelinePoint>,
    pub(crate) percentile_curve: Vec<CurvePoint>,
    pub(crate) server: Option<ServerFigures>,
    pub(crate) client: ClientFigures,
}

/// Runs `fanout` and prints the result.
///
/// # Errors
/// Bad arguments, or a run that could not start (no server, workers failing).
pub(crate) fn run(args: &FanoutArgs) -> Result<()> {
    let report = measure(args)?;
    if let Some(path) = &args.output.report {
        crate::report::write_fanout(path, &report)?;
    }
    if args.output.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", crate::report::format_report(&report));
    }
    Ok(())
}

/// Builds the worker configs for `conns` connections.
///
/// # Errors
/// Bad `--source-ips`, zero procs, or more connections per process than the open-file limit
/// allows.
pub(crate) fn worker_configs(
    url: &str,
    conns: usize,
    load: &LoadArgs,
    channels: &[String],
    subscribe: Option<(&str, &str)>,
) -> Result<Vec<WorkerConfig>> {
    if load.procs == 0 {
        bail!("--procs must be at least 1");
    }
    let auto = load.source_ips.trim() == "auto";
    let source_ips = if auto {
        Vec::new()
    } else {
        parse_source_ips(&load.source_ips)?
    };
    let limit = raise_nofile_limit();
    let per_proc = conns.div_ceil(load.procs) as u64;
    if per_proc + SPARE_FDS > limit {
        let needed = (conns as u64).div_ceil(limit.saturating_sub(SPARE_FDS).max(1));
        bail!(
            "{conns} connections over {} process(es) is {per_proc} per process, above the \
             open-file limit of {limit}: use --procs {needed} or more",
            load.procs
        );
    }
    let urls: Vec<&str> = url.split(',').map(str::trim).collect();
    let loopback = |url: &str| -> Result<bool> { Ok(Target::parse(url)?.addr.ip().is_loopback()) };
    let spreads_itself = auto && urls.iter().all(|url| loopback(url).unwrap_or(false));
    let sources = source_ips.len().max(1);
    if !spreads_itself && conns / sources > 28_000 {
        eprintln!(
            "warning: {} connections per source address may run out of ephemeral ports; \
             add --source-ips",
            conns / sources
        );
    }
    (0..load.procs)
        .map(|index| -> Result<_> {
            let url = urls[index % urls.len()];
            Ok(WorkerConfig {
                spread: auto && loopback(url)?,
                url: url.to_owned(),
                index,
                workers: load.procs,
                conns,
                channels: channels.to_vec(),
                source_ips: source_ips.clone(),
                connect_rate: load.connect_rate / load.procs as f64,
                connect_retries: load.connect_retries,
                connect_timeout_ms: load.connect_timeout_ms,
                max_in_flight: load.max_in_flight,
                subscribe_template: subscribe.map(|(template, _)| template.to_owned()),
                subscribe_reply: subscribe
                    .map(|(_, reply)| reply.to_owned())
                    .unwrap_or_default(),
                deflate: load.deflate,
                insecure: load.insecure,
            })
        })
        .collect()
}

/// The first of a comma-separated `--url` list: where the publisher connects.
pub(crate) fn first_url(urls: &str) -> &str {
    urls.split(',').next().unwrap_or(urls).trim()
}

/// Reads the server pids, if any were given.
fn sample_server(pids: &[u32]) -> Result<Option<ProcSample>> {
    if pids.is_empty() {
        Ok(None)
    } else {
        sample_pids(pids).map(Some)
    }
}

/// Spawns the workers and waits until every connection is resolved (open and subscribed, or
/// failed for good).
///
/// # Errors
/// A worker that fails or exits.
pub(crate) fn connect_fleet(
    configs: &[WorkerConfig],
    quiet: bool,
) -> Result<(Fleet, ConnectSummary, Vec<u64>)> {
    let conns = configs.first().map_or(0, |config| config.conns) as u64;
    let channels = configs.first().map_or(0, |config| config.channels.len());
    let started = Instant::now();
    let fleet = Fleet::spawn(configs)?;
    let mut summary = ConnectSummary {
        attempted: conns,
        ..ConnectSummary::default()
    };
    let mut subs_per_channel = vec![0u64; channels];
    let mut ready = 0;
    let mut opened = vec![0u64; configs.len()];
    let mut last_print = Instant::now();
    let mut spreads = Vec::new();
    while ready < configs.len() {
        match fleet.recv(Duration::from_millis(500)) {
            Some((_, Report::Ready(worker))) => {
                ready += 1;
                summary.ok += worker.ok;
                summary.failed += worker.failed;
                summary.retries += worker.retries;
                for (reason, count) in worker.failures {
                    *summary.failures.entry(reason).or_default() += count;
                }
                for (total, count) in subs_per_channel.iter_mut().zip(&worker.subs_per_channel) {
                    *total += count;
                }
                spreads.extend(worker.spread);
            }
            Some((index, Report::Progress { opened: n, .. })) => opened[index] = n,
            Some((index, Report::Error { message })) => bail!("worker {index}: {message}"),
            Some((_, Report::Done(_))) | None => {}
        }
        if !quiet && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "connecting: {} of {conns} open after {:.1} s",
                opened.iter().sum::<u64>(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    summary.spread = SpreadReport::merge(spreads);
    if let Some(line) = summary.spread.as_ref().and_then(|s| s.announce(summary.ok)) {
        eprintln!("{line}");
    }
    summary.seconds = round3(started.elapsed().as_secs_f64());
    summary.per_second = round1(summary.ok as f64 / summary.seconds.max(1e-9));
    Ok((fleet, summary, subs_per_channel))
}

/// Runs one fan-out measurement.
///
/// # Errors
/// Bad arguments, no server, a worker failing.
pub(crate) fn measure(args: &FanoutArgs) -> Result<FanoutReport> {
    let run = &args.run;
    if args.conns == 0
        || run.channels == 0
        || args.rate <= 0.0
        || run.duration <= 0.0
        || args.burst == 0
    {
        bail!("--conns, --channels, --rate, --duration and --burst must be positive");
    }
    let quiet = args.output.quiet;
    let channels: Vec<String> = (0..run.channels)
        .map(|c| format!("{}-{c}", run.channel_prefix))
        .collect();
    let publisher = Publisher::new(args, &channels)?;
    let subscribe = (!run.subscribe_template.is_empty()).then_some((
        run.subscribe_template.as_str(),
        run.subscribe_reply.as_str(),
    ));
    let configs = worker_configs(&run.url, args.conns, &run.load, &channels, subscribe)?;

    let server_before = sample_server(&run.server_pid)?;
    let (mut fleet, mut connect, subs_per_channel) = connect_fleet(&configs, quiet)?;
    let server_after_connect = sample_server(&run.server_pid)?;
    if connect.failed > 0 {
        connect.server_limit = file_limit_note(&run.server_pid);
    }
    if connect.ok == 0 {
        bail!("no connection succeeded: {:?}", connect.failures);
    }
    if !quiet {
        eprintln!(
            "connected {} ({} failed) in {:.2} s; publishing {} msg/s for {} s",
            connect.ok, connect.failed, connect.seconds, args.rate, run.duration
        );
    }

    let mut publisher = publisher.connect()?;
    let t0 = monotonic_ns() + 200_000_000;
    fleet.send(Command::Measure { t0_ns: t0 })?;
    let client_cpu_before = self_cpu_ns();
    let server_cpu_before = sample_server(&run.server_pid)?;
    let total = (args.rate * run.duration).round().max(1.0) as u64;
    let interval_ns = 1e9 / args.rate;
    let publish_thread = std::thread::spawn(move || {
        let result = publisher.run(t0, total, interval_ns);
        (publisher, result)
    });

    let mut received = vec![0u64; configs.len()];
    let track = |fleet: &Fleet, received: &mut [u64], wait: Duration| -> Result<()> {
        match fleet.recv(wait) {
            Some((index, Report::Progress { received: n, .. })) => received[index] = n,
            Some((index, Report::Error { message })) => bail!("worker {index}: {message}"),
            _ => {}
        }
        Ok(())
    };
    while !publish_thread.is_finished() {
        track(&fleet, &mut received, Duration::from_millis(100))?;
    }
    let (publisher, publish_result) = publish_thread.join().expect("publisher thread");
    let outcome = publish_result?;
    let expected: u64 = outcome
        .per_channel
        .iter()
        .zip(&subs_per_channel)
        .map(|(published, subs)| published * subs)
        .sum();
    let drain_deadline = Instant::now() + Duration::from_secs_f64(run.drain_timeout);
    let mut last_total = 0;
    let mut last_change = Instant::now();
    while Instant::now() < drain_deadline {
        track(&fleet, &mut received, Duration::from_millis(100))?;
        let total: u64 = received.iter().sum();
        if total >= expected && publisher.acks_done(outcome.published) {
            break;
        }
        if total != last_total {
            last_total = total;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let acked = publisher.acked();
    drop(publisher);
    let server_after = sample_server(&run.server_pid)?;
    let coordinator_cpu = self_cpu_ns().saturating_sub(client_cpu_before);

    fleet.send(Command::Stop)?;
    let mut dones = Vec::new();
    while dones.len() < configs.len() {
        match fleet.recv(Duration::from_secs(30)) {
            Some((_, Report::Done(done))) => dones.push(*done),
            Some((index, Report::Error { message })) => bail!("worker {index}: {message}"),
            Some(_) => {}
            None => bail!("workers did not report within 30 s"),
        }
    }
    fleet.wait();

    let mut hist = new_histogram();
    let mut timeline = Timeline::default();
    let mut deliveries = Deliveries {
        expected,
        ..Deliveries::default()
    };
    let mut client = ClientFigures {
        cpu_ns: coordinator_cpu,
        procs: configs.len(),
        ..ClientFigures::default()
    };
    let mut last_recv_ns = 0;
    let mut bytes_read = 0;
    for (done, config) in dones.iter().zip(&configs) {
        merge(&mut hist, &decode_histogram(&done.histogram)?);
        timeline.merge(&Timeline::decode(&done.timeline)?);
        deliveries.received += done.received;
        deliveries.duplicated += done.duplicated;
        deliveries.out_of_order += done.out_of_order;
        for (reason, count) in &done.disconnected {
            *deliveries.disconnected.entry(reason.clone()).or_default() += count;
        }
        last_recv_ns = last_recv_ns.max(done.last_recv_ns);
        client.cpu_ns += done.cpu_ns;
        bytes_read += done.bytes_read;
        let held = (config.conns / config.workers).max(1) as f64;
        client.rss_bytes_per_conn = client
            .rss_bytes_per_conn
            .max(round1(done.rss_bytes as f64 / held));
    }
    deliveries.lost = expected.saturating_sub(deliveries.received);
    let span_s = last_recv_ns.saturating_sub(t0) as f64 / 1e9;
    if span_s > 0.0 {
        deliveries.per_second = round1(deliveries.received as f64 / span_s);
    }
    client.cpu_ns_per_delivery = per(client.cpu_ns, deliveries.received);
    client.wire_bytes_per_delivery = per(bytes_read, deliveries.received);

    let server = match (
        server_before,
        server_after_connect,
        server_cpu_before,
        server_after,
    ) {
        (Some(before), Some(connected), Some(cpu_before), Some(after)) => {
            let cpu_ns = after.cpu_ns.saturating_sub(cpu_before.cpu_ns);
            let before_rss = args.rss_baseline.unwrap_or(before.rss_bytes);
            let grown = connected.rss_bytes.saturating_sub(before_rss);
            // A server that held memory from earlier connections reuses it, so RSS may not
            // grow, or even shrink as the allocator purges: no figure rather than a false one.
            let rss_note = (grown == 0).then(|| {
                "not measured: the server's RSS did not grow (it reused memory it held \
                 before the run; measure on a fresh server)"
                    .to_owned()
            });
            Some(ServerFigures {
                pids: run.server_pid.clone(),
                cpu_ns,
                cpu_ns_per_delivery: per(cpu_ns, deliveries.received),
                rss_bytes_before: before_rss,
                rss_bytes_after_connect: connected.rss_bytes,
                rss_bytes_after: after.rss_bytes,
                rss_bytes_per_conn: per(grown, connect.ok),
                rss_note,
            })
        }
        _ => None,
    };

    Ok(FanoutReport {
        mode: "fanout".to_owned(),
        config: serde_json::to_value(args)?,
        connect,
        published: outcome.published,
        acked,
        publisher_max_behind_us: outcome.max_behind_ns / 1000,
        publish_errors: outcome.errors,
        latency_us: LatencySummary::of(&hist),
        deliveries,
        timeline: timeline.points(),
        percentile_curve: percentile_curve(&hist),
        server,
        client,
    })
}

/// `a / b` rounded to 0.1, 0 when `b` is 0.
#[must_use]
pub(crate) fn per(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        round1(a as f64 / b as f64)
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn a_burst_shares_one_slot_and_keeps_the_average_rate() {
        let at = |k| scheduled_ns(1000, k, 10.0, 4);
        assert_eq!([at(0), at(1), at(2), at(3)], [1000; 4]);
        assert_eq!(at(4), 1040);
        assert_eq!(at(11), 1080);
        // Without bursts every message has its own slot.
        assert_eq!(scheduled_ns(1000, 3, 10.0, 1), 1030);
    }

    #[test]
    fn json_report_has_the_documented_shape() {
        let cli = crate::Cli::parse_from([
            "herald-bench",
            "fanout",
            "--conns",
            "10",
            "--server-pid",
            "1",
        ]);
        let crate::Subcommand::Fanout(args) = cli.command else {
            panic!("fanout expected");
        };
        let mut hist = new_histogram();
        hist.record(120).unwrap();
        let mut timeline = Timeline::default();
        timeline.record(5, 120);
        let report = FanoutReport {
            mode: "fanout".to_owned(),
            config: serde_json::to_value(&args).unwrap(),
            connect: ConnectSummary::default(),
            published: 1,
            acked: 1,
            publisher_max_behind_us: 0,
            publish_errors: Vec::new(),
            latency_us: LatencySummary::of(&hist),
            deliveries: Deliveries::default(),
            timeline: timeline.points(),
            percentile_curve: percentile_curve(&hist),
            server: Some(ServerFigures::default()),
            client: ClientFigures::default(),
        };
        let value = serde_json::to_value(&report).unwrap();
        check_fanout_json(&value);
        assert_eq!(value["config"]["conns"], 10);
        assert_eq!(value["config"]["server_pid"][0], 1);
        assert!(value["config"].get("json").is_none());
        assert!(crate::report::format_report(&report).contains("p99"));
        let back: FanoutReport = serde_json::from_value(value).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn a_url_list_spreads_workers_over_servers_and_publishes_to_the_first() {
        let cli = crate::Cli::parse_from([
            "herald-bench",
            "fanout",
            "--conns",
            "30",
            "--procs",
            "3",
            "--url",
            "ws://127.0.0.1:8001/ws, ws://127.0.0.1:8002/ws",
        ]);
        let crate::Subcommand::Fanout(args) = cli.command else {
            panic!("fanout expected");
        };
        let configs = worker_configs(&args.run.url, 30, &args.run.load, &[], None).unwrap();
        let urls: Vec<&str> = configs.iter().map(|c| c.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "ws://127.0.0.1:8001/ws",
                "ws://127.0.0.1:8002/ws",
                "ws://127.0.0.1:8001/ws"
            ]
        );
        assert_eq!(first_url(&args.run.url), "ws://127.0.0.1:8001/ws");
    }

    /// The field names other tools and the README read.
    pub(crate) fn check_fanout_json(value: &serde_json::Value) {
        assert_eq!(value["mode"], "fanout");
        for key in [
            "conns",
            "rate",
            "size",
            "url",
            "channels",
            "duration",
            "procs",
            "source_ips",
        ] {
            assert!(value["config"].get(key).is_some(), "config.{key}");
        }
        for key in ["attempted", "ok", "failed", "seconds", "per_second"] {
            assert!(value["connect"][key].is_number(), "connect.{key}");
        }
        assert!(value["published"].is_u64() && value["acked"].is_u64());
        for key in ["p50", "p90", "p99", "p999", "p9999", "max", "mean", "count"] {
            assert!(value["latency_us"][key].is_number(), "latency_us.{key}");
        }
        for key in [
            "expected",
            "received",
            "lost",
            "duplicated",
            "out_of_order",
            "per_second",
        ] {
            assert!(value["deliveries"][key].is_number(), "deliveries.{key}");
        }
        for point in value["timeline"].as_array().unwrap() {
            for key in ["t", "deliveries", "p50_us", "p99_us"] {
                assert!(point[key].is_number(), "timeline.{key}");
            }
        }
        for point in value["percentile_curve"].as_array().unwrap() {
            assert!(point["q"].is_number() && point["us"].is_number());
        }
        if !value["server"].is_null() {
            for key in [
                "cpu_ns",
                "cpu_ns_per_delivery",
                "rss_bytes_before",
                "rss_bytes_after",
                "rss_bytes_per_conn",
            ] {
                assert!(value["server"][key].is_number(), "server.{key}");
            }
            assert!(value["server"]["pids"].is_array());
        }
        for key in ["cpu_ns", "cpu_ns_per_delivery"] {
            assert!(value["client"][key].is_number(), "client.{key}");
        }
    }
}
