//! `plan`: from a sweep's measured points, the cores and memory one machine needs for a
//! load, or how many machines of a given kind, with the arithmetic shown and what was
//! measured kept apart from what was modelled or extrapolated.
//!
//! CPU: deliveries/s × server CPU per delivery of the sweep's largest point that met the
//! objective at this message size, divided by the utilisation to plan for; and at least
//! enough shards that one message reaches all its subscribers within the objective (the
//! burst bound of tuning/README.md §8). Memory: the sweep's server RSS per connection plus
//! what `herald::memory` counts for the kernel, TLS and compressor state.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use herald::compression::CompressionPolicy;
use herald::memory::{DEFAULT_BUFFERS_BUSY, PerConnection, human_bytes};
use serde::Serialize;

use crate::sweep::{Point, SweepReport, largest_passing};

/// TLS's CPU per delivery over plain, for a sweep measured without it: README "TLS",
/// 1.24× median (1.2–1.4× over runs); the upper end, to be safe.
const TLS_CPU_FACTOR: f64 = 1.4;
/// A connection's own compressor's CPU per delivery over plain, for a sweep measured
/// without compression: README "permessage-deflate", 11×.
const PER_CONNECTION_CPU_FACTOR: f64 = 11.0;

/// `herald-bench plan`.
#[derive(Debug, Clone, Args)]
pub(crate) struct PlanArgs {
    /// Connections to hold, each subscribed to one channel.
    #[arg(long)]
    pub(crate) connections: u64,
    /// Messages published per second, over all channels.
    #[arg(long)]
    pub(crate) rate: f64,
    /// Size of each message's data in bytes, as the sweep's --size.
    #[arg(long, default_value_t = 64)]
    pub(crate) size: usize,
    /// Channels the connections are spread over evenly: each message reaches
    /// connections / channels subscribers (the sweep measures one channel).
    #[arg(long, default_value_t = 1)]
    pub(crate) channels: u64,
    /// The server will run TLS (a sweep over wss:// measured it; otherwise 8 KB of session
    /// state per connection and 1.4× the CPU per delivery are added).
    #[arg(long)]
    pub(crate) tls: bool,
    /// The server's --compression (a sweep without --deflate measured none: per-connection
    /// adds a 160 KiB compressor per connection and 11× the CPU per delivery).
    #[arg(long, value_enum, default_value = "off")]
    pub(crate) compression: CompressionPolicy,
    /// The objective: p99 latency at most this many milliseconds.
    #[arg(long)]
    pub(crate) slo_p99: f64,
    /// The `--json` output of `herald-bench sweep` (its last line is read).
    #[arg(long)]
    pub(crate) from: PathBuf,
    /// Cores of one machine of the kind to count machines of (default: this machine's).
    #[arg(long)]
    pub(crate) cores: Option<u64>,
    /// Memory of one machine of that kind, GiB (default: this machine's MemTotal).
    #[arg(long)]
    pub(crate) memory_gib: Option<f64>,
    /// Share of each machine's cores and memory the load may take; the rest is the margin
    /// that keeps queues short and leaves room for reconnect storms and the system.
    #[arg(long, default_value_t = 0.7)]
    pub(crate) utilisation: f64,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The measured point a plan stands on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Basis {
    pub(crate) conns: usize,
    pub(crate) rate: f64,
    pub(crate) size: usize,
    pub(crate) p99_us: u64,
    pub(crate) deliveries_per_second: f64,
    pub(crate) cpu_ns_per_delivery: f64,
    pub(crate) rss_bytes_per_conn: f64,
    /// Whether the sweep ran over TLS and offered permessage-deflate.
    pub(crate) tls: bool,
    pub(crate) deflate: bool,
}

/// The plan; also the `--json` output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Plan {
    pub(crate) basis: Basis,
    pub(crate) deliveries_per_second: f64,
    pub(crate) subscribers_per_message: f64,
    /// CPU per delivery for this load: the basis's, times the TLS and compression factors
    /// when the sweep did not measure them.
    pub(crate) cpu_ns_per_delivery: f64,
    /// Cores kept busy: deliveries/s × CPU per delivery.
    pub(crate) busy_cores: f64,
    /// busy_cores / utilisation.
    pub(crate) cores_for_utilisation: f64,
    /// Shards for one message to reach all its subscribers within the objective.
    pub(crate) cores_for_burst: f64,
    /// Whole cores one machine needs: the larger of the two.
    pub(crate) cores: u64,
    pub(crate) memory_per_connection: PerConnection,
    /// Every connection busy, at the high figures.
    pub(crate) memory_bytes: u64,
    /// memory_bytes / utilisation.
    pub(crate) memory_for_utilisation: u64,
    pub(crate) machine_cores: u64,
    pub(crate) machine_memory_bytes: u64,
    /// Machines of that kind; one means one machine holds the load.
    pub(crate) machines: u64,
    /// Share of the machines' cores and memory left free at that count.
    pub(crate) cpu_margin: f64,
    /// At that count, how long one message takes to reach all its subscribers on one
    /// machine (its share of them over its cores), ms: the burst bound's margin.
    pub(crate) burst_ms: f64,
    pub(crate) memory_margin: f64,
    /// What goes beyond what the sweep measured.
    pub(crate) extrapolated: Vec<String>,
}

/// Runs `plan` and prints it.
///
/// # Errors
/// An unreadable sweep file, or no measured point that meets the objective.
pub(crate) fn run(args: &PlanArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.from)
        .with_context(|| format!("reading {}", args.from.display()))?;
    let line = text
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .context("empty sweep file")?;
    let sweep: SweepReport = serde_json::from_str(line).with_context(|| {
        format!(
            "{} is not herald-bench sweep --json output",
            args.from.display()
        )
    })?;
    let machine = Machine {
        cores: match args.cores {
            Some(cores) => cores,
            None => std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
        },
        memory_bytes: match args.memory_gib {
            Some(gib) => (gib * f64::from(1u32 << 30)) as u64,
            None => mem_total().context("reading MemTotal: give --memory-gib")?,
        },
    };
    let plan = plan(args, &sweep, machine)?;
    if args.json {
        println!("{}", serde_json::to_string(&plan)?);
    } else {
        print!("{}", format_plan(args, &plan));
    }
    Ok(())
}

/// One machine of the kind planned for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Machine {
    pub(crate) cores: u64,
    pub(crate) memory_bytes: u64,
}

fn mem_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The measured point to plan from: the largest that meets the objective among the
/// points of this message size, or of the nearest size measured.
fn basis(args: &PlanArgs, points: &[Point]) -> Result<Point> {
    let slo_us = (args.slo_p99 * 1000.0) as u64;
    let mut points = points.to_vec();
    largest_passing(&mut points, slo_us);
    let nearest = points
        .iter()
        .filter(|point| point.meets_slo)
        .map(|point| point.size)
        .min_by_key(|&size| size.abs_diff(args.size))
        .with_context(|| {
            format!(
                "no point of the sweep meets p99 <= {} ms with nothing lost: nothing to plan \
                 from (sweep smaller loads)",
                args.slo_p99
            )
        })?;
    points.retain(|point| point.size == nearest);
    let best = largest_passing(&mut points, slo_us).context("a passing point of this size")?;
    Ok(points.swap_remove(best))
}

/// The arithmetic.
///
/// # Errors
/// Bad arguments, or no measured point that meets the objective or has the figures needed.
pub(crate) fn plan(args: &PlanArgs, sweep: &SweepReport, machine: Machine) -> Result<Plan> {
    if args.connections == 0 || args.rate <= 0.0 || args.channels == 0 || args.slo_p99 <= 0.0 {
        bail!("--connections, --rate, --channels and --slo-p99 must be positive");
    }
    if !(args.utilisation > 0.0 && args.utilisation <= 1.0) {
        bail!("--utilisation is a share: above 0, at most 1");
    }
    let point = basis(args, &sweep.points)?;
    let tls = sweep.config["url"]
        .as_str()
        .is_some_and(|url| url.starts_with("wss://"));
    let deflate = sweep.config["deflate"].as_bool().unwrap_or(false);
    let basis = Basis {
        conns: point.conns,
        rate: point.rate,
        size: point.size,
        p99_us: point.p99_us,
        deliveries_per_second: point.deliveries_per_second,
        cpu_ns_per_delivery: point.server_cpu_ns_per_delivery.with_context(
            || "the sweep has no server CPU per delivery: run it with --server-pid or --server-cmd",
        )?,
        rss_bytes_per_conn: point.server_rss_bytes_per_conn.with_context(|| {
            format!(
                "the sweep did not measure server memory at {} conns: run it with --server-cmd",
                point.conns
            )
        })?,
        tls,
        deflate,
    };

    let mut extrapolated = Vec::new();
    if basis.size != args.size {
        extrapolated.push(format!(
            "message size: measured {} B, planned {} B",
            basis.size, args.size
        ));
    }
    let mut cpu_ns = basis.cpu_ns_per_delivery;
    if args.tls && !basis.tls {
        cpu_ns *= TLS_CPU_FACTOR;
        extrapolated.push(format!(
            "TLS: the sweep was plain; CPU per delivery x {TLS_CPU_FACTOR} and 8 KB of \
             session state per connection (README, TLS)"
        ));
    }
    if args.compression == CompressionPolicy::PerConnection && !basis.deflate {
        cpu_ns *= PER_CONNECTION_CPU_FACTOR;
        extrapolated.push(format!(
            "per-connection compression: the sweep had none; CPU per delivery x \
             {PER_CONNECTION_CPU_FACTOR} (README, permessage-deflate)"
        ));
    }
    let subscribers = args.connections as f64 / args.channels as f64;
    let deliveries = args.rate * subscribers;
    if deliveries > basis.deliveries_per_second || args.connections > basis.conns as u64 {
        let largest = sweep.points.iter().map(|p| p.conns).max().unwrap_or(0);
        extrapolated.push(format!(
            "load: {} connections and {deliveries:.0} deliveries/s against the basis point's \
             {} and {:.0} (the sweep's largest point had {largest} connections); CPU per \
             delivery and memory per connection are taken to stay as measured there",
            args.connections, basis.conns, basis.deliveries_per_second
        ));
    }
    let busy_cores = deliveries * cpu_ns / 1e9;
    let cores_for_utilisation = busy_cores / args.utilisation;
    let cores_for_burst = subscribers * cpu_ns / (args.slo_p99 * 1e6);
    let cores = cores_for_utilisation.max(cores_for_burst).ceil().max(1.0) as u64;

    // RSS is measured once connected, before any message: TLS state is in it when the
    // sweep ran over TLS, a compressor never is (it comes with the first message).
    let mut memory = PerConnection::new(args.tls, args.compression, DEFAULT_BUFFERS_BUSY)
        .with_herald(basis.rss_bytes_per_conn.ceil() as u64);
    if basis.tls {
        memory.tls = 0;
    }
    let memory_bytes = memory.busy_high().saturating_mul(args.connections);
    let memory_for_utilisation = (memory_bytes as f64 / args.utilisation).ceil() as u64;

    let machines = (cores as f64 / machine.cores.max(1) as f64)
        .max(memory_for_utilisation as f64 / machine.memory_bytes.max(1) as f64)
        .ceil()
        .max(1.0) as u64;
    let cpu_margin = 1.0 - busy_cores / (machines * machine.cores) as f64;
    let burst_ms = subscribers / machines as f64 * cpu_ns / machine.cores as f64 / 1e6;
    let memory_margin =
        1.0 - memory_bytes as f64 / machines.saturating_mul(machine.memory_bytes) as f64;
    Ok(Plan {
        basis,
        deliveries_per_second: deliveries,
        subscribers_per_message: subscribers,
        cpu_ns_per_delivery: cpu_ns,
        busy_cores,
        cores_for_utilisation,
        cores_for_burst,
        cores,
        memory_per_connection: memory,
        memory_bytes,
        memory_for_utilisation,
        machine_cores: machine.cores,
        machine_memory_bytes: machine.memory_bytes,
        machines,
        cpu_margin,
        burst_ms,
        memory_margin,
        extrapolated,
    })
}

/// The plan with its arithmetic, for people.
#[must_use]
pub(crate) fn format_plan(args: &PlanArgs, plan: &Plan) -> String {
    let b = &plan.basis;
    let m = &plan.memory_per_connection;
    let per_conn = m.busy_high();
    let mut out = format!(
        "plan: {} connections, {} msg/s of {} B over {} channel(s), p99 <= {} ms{}{}\n",
        args.connections,
        args.rate,
        args.size,
        args.channels,
        args.slo_p99,
        if args.tls { ", TLS" } else { "" },
        match args.compression {
            CompressionPolicy::Off => "",
            CompressionPolicy::Shared => ", shared compression",
            CompressionPolicy::PerConnection => ", per-connection compression",
        }
    );
    out.push_str(&format!(
        "measured (from {}): {} conns x {} msg/s x {} B, the largest point of that size \
         meeting the objective: p99 {:.1} ms, {:.0} deliveries/s, {:.0} ns of server CPU per \
         delivery, {:.0} B of server RSS per connection{}\n\n",
        args.from.display(),
        b.conns,
        b.rate,
        b.size,
        b.p99_us as f64 / 1000.0,
        b.deliveries_per_second,
        b.cpu_ns_per_delivery,
        b.rss_bytes_per_conn,
        if b.tls { " (over TLS)" } else { "" }
    ));
    out.push_str(&format!(
        "CPU\n  deliveries/s      {} msg/s x {:.0} subscribers per message = {:.0}/s\n",
        args.rate, plan.subscribers_per_message, plan.deliveries_per_second
    ));
    out.push_str(&format!(
        "  busy              {:.0}/s x {:.0} ns per delivery = {:.2} cores\n",
        plan.deliveries_per_second, plan.cpu_ns_per_delivery, plan.busy_cores
    ));
    out.push_str(&format!(
        "  utilisation       {:.2} / {} = {:.2} cores\n",
        plan.busy_cores, args.utilisation, plan.cores_for_utilisation
    ));
    out.push_str(&format!(
        "  burst             {:.0} subscribers x {:.0} ns / {} ms = {:.2} shards for one \
         message to reach all its subscribers in time\n",
        plan.subscribers_per_message, plan.cpu_ns_per_delivery, args.slo_p99, plan.cores_for_burst
    ));
    out.push_str(&format!(
        "  cores             the larger, rounded up = {}\n",
        plan.cores
    ));
    out.push_str(&format!(
        "memory per connection (every socket busy)\n  herald user space {:>9} B  measured\n  \
         kernel structures {:>9} B  model, high\n  TLS session state {:>9} B  {}\n  \
         own compressor    {:>9} B  model\n  socket buffers    {:>9} B  model (tcp_rmem + \
         tcp_wmem min)\n  total             {:>9} B x {} = {}; / {} = {}\n\n",
        m.herald.1,
        m.kernel_structures.1,
        m.tls,
        if b.tls {
            "in the measured figure"
        } else {
            "model"
        },
        m.compressor,
        m.buffers_busy,
        per_conn,
        args.connections,
        human_bytes(plan.memory_bytes),
        args.utilisation,
        human_bytes(plan.memory_for_utilisation)
    ));
    out.push_str(&format!(
        "one machine needs {} cores and {}\n",
        plan.cores,
        human_bytes(plan.memory_for_utilisation)
    ));
    out.push_str(&format!(
        "machines with {} cores and {}: {} (CPU {} / {} cores, memory {} / {}); margin at \
         that count: {:.0}% of the CPU and {:.0}% of the memory free, and one message reaches \
         all its subscribers in {:.1} ms of CPU per machine against the {} ms objective\n",
        plan.machine_cores,
        human_bytes(plan.machine_memory_bytes),
        plan.machines,
        plan.cores,
        plan.machine_cores,
        human_bytes(plan.memory_for_utilisation),
        human_bytes(plan.machine_memory_bytes),
        plan.cpu_margin * 100.0,
        plan.memory_margin * 100.0,
        plan.burst_ms,
        args.slo_p99
    ));
    if plan.extrapolated.is_empty() {
        out.push_str("extrapolated: nothing; the load is within what the sweep measured\n");
    } else {
        out.push_str("extrapolated (not measured):\n");
        for line in &plan.extrapolated {
            out.push_str(&format!("  - {line}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::tests::point;

    fn measured(conns: usize, p99_ms: u64, cpu_ns: f64, rss: f64) -> Point {
        let mut p = point(conns, 20.0, 64, p99_ms * 1000, 0);
        p.error = None;
        p.deliveries_per_second = conns as f64 * 20.0;
        p.server_cpu_ns_per_delivery = Some(cpu_ns);
        p.server_rss_bytes_per_conn = Some(rss);
        p
    }

    fn sweep(url: &str) -> SweepReport {
        SweepReport {
            mode: "sweep".to_owned(),
            config: serde_json::json!({ "url": url, "deflate": false }),
            slo_p99_ms: 50.0,
            memory: String::new(),
            points: vec![
                measured(1000, 20, 8000.0, 1500.0),
                measured(5000, 40, 5000.0, 1200.0),
                measured(10_000, 200, 4000.0, 1100.0),
            ],
            best: None,
            runs: Vec::new(),
        }
    }

    fn args(extra: &[&str]) -> PlanArgs {
        let cli = crate::Cli::parse_from(
            [
                "herald-bench",
                "plan",
                "--connections",
                "100000",
                "--rate",
                "5",
                "--channels",
                "10",
                "--slo-p99",
                "50",
                "--from",
                "sweep.json",
            ]
            .iter()
            .chain(extra),
        );
        let crate::Subcommand::Plan(args) = cli.command else {
            panic!("plan expected");
        };
        args
    }

    use clap::Parser as _;

    const MACHINE: Machine = Machine {
        cores: 16,
        memory_bytes: 64 << 30,
    };

    #[test]
    fn stands_on_the_largest_passing_point_and_shows_its_arithmetic() {
        let plan = plan(&args(&[]), &sweep("ws://127.0.0.1:9000/ws"), MACHINE).unwrap();
        assert_eq!(plan.basis.conns, 5000);
        // 5 msg/s x 100,000 / 10 channels = 50,000 deliveries/s x 5,000 ns = 0.25 cores.
        assert_eq!(plan.deliveries_per_second, 50_000.0);
        assert!((plan.busy_cores - 0.25).abs() < 1e-9);
        assert!((plan.cores_for_utilisation - 0.25 / 0.7).abs() < 1e-9);
        // 10,000 subscribers x 5,000 ns = 50 ms of CPU per message: one shard, just.
        assert!((plan.cores_for_burst - 1.0).abs() < 1e-9);
        assert_eq!(plan.cores, 1);
        // 1,200 measured + 4,096 kernel + 8,192 buffers per connection.
        assert_eq!(plan.memory_per_connection.busy_high(), 13_488);
        assert_eq!(plan.memory_bytes, 1_348_800_000);
        assert_eq!(plan.memory_for_utilisation, 1_926_857_143);
        assert_eq!(plan.machines, 1);
        assert!((plan.cpu_margin - (1.0 - 0.25 / 16.0)).abs() < 1e-9);
        // 10,000 subscribers x 5,000 ns over 16 cores.
        assert!((plan.burst_ms - 3.125).abs() < 1e-9);
        assert_eq!(plan.extrapolated.len(), 1, "{:?}", plan.extrapolated);
        let text = format_plan(&args(&[]), &plan);
        for line in [
            "5 msg/s x 10000 subscribers per message = 50000/s",
            "50000/s x 5000 ns per delivery = 0.25 cores",
            "10000 subscribers x 5000 ns / 50 ms = 1.00 shards",
            "one machine needs 1 cores",
            "extrapolated (not measured):",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
    }

    #[test]
    fn adds_tls_and_compressor_state_the_sweep_did_not_measure_and_counts_machines() {
        let extra = ["--tls", "--compression", "per-connection"];
        let plan = plan(&args(&extra), &sweep("ws://127.0.0.1:9000/ws"), MACHINE).unwrap();
        assert!((plan.cpu_ns_per_delivery - 5000.0 * 1.4 * 11.0).abs() < 1e-6);
        assert_eq!(plan.memory_per_connection.tls, 8_192);
        assert_eq!(plan.memory_per_connection.compressor, 163_840);
        // 77 µs x 50,000/s = 3.85 busy cores / 0.7 = 5.5; 10,000 x 77 µs / 50 ms = 15.4.
        assert_eq!(plan.cores, 16);
        assert_eq!(plan.extrapolated.len(), 3);
        let machines = plan.machines;
        let small = Machine {
            cores: 4,
            memory_bytes: 8 << 30,
        };
        let on_small = super::plan(&args(&extra), &sweep("ws://h/ws"), small).unwrap();
        assert_eq!(machines, 1);
        // 16 cores / 4 = 4 machines; memory 18.5 GB / 0.7 / 8 GiB = 3.1 -> 4.
        assert_eq!(on_small.machines, 4);
        // Over TLS the measured RSS holds the session already.
        let over_tls = super::plan(&args(&["--tls"]), &sweep("wss://h/ws"), MACHINE).unwrap();
        assert_eq!(over_tls.memory_per_connection.tls, 0);
        assert_eq!(over_tls.cpu_ns_per_delivery, 5000.0);
    }

    #[test]
    fn refuses_to_plan_without_a_passing_point() {
        let mut strict = args(&[]);
        strict.slo_p99 = 5.0;
        let error = plan(&strict, &sweep("ws://h/ws"), MACHINE).unwrap_err();
        assert!(
            error.to_string().contains("no point of the sweep meets"),
            "{error}"
        );
    }
}
