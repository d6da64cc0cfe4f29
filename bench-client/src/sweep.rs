//! `sweep`: `fanout` over a grid of connections x rate x size, a capacity table, and the
//! largest point that meets the p99 objective with nothing lost.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::capacity::knees_text;
use crate::fanout::{FanoutArgs, FanoutReport, OutputArgs, RunArgs, first_url, measure};
use crate::server::{Reused, Started};
use crate::source::SpreadReport;
use crate::stats::human_us;

/// `herald-bench sweep`.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub(crate) struct SweepArgs {
    /// Subscriber counts to try, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub(crate) conns: Vec<usize>,
    /// Publish rates (messages/s) to try, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "20")]
    pub(crate) rate: Vec<f64>,
    /// Message sizes (bytes) to try, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    pub(crate) size: Vec<usize>,
    /// The objective: p99 latency at most this many milliseconds (and nothing lost,
    /// duplicated or reordered, and every connection made).
    #[arg(long, default_value_t = 50.0)]
    pub(crate) slo_p99: f64,
    /// Seconds to pause between points (lets the server settle and sockets close).
    #[arg(long, default_value_t = 2.0)]
    pub(crate) pause: f64,
    /// Start the server afresh for each point with this shell command (it must listen on
    /// --url) and measure it, killing it after the point: memory per connection then
    /// counts from a fresh process. Without it, each point waits (up to 30 s) for the
    /// --server-pid server to close the previous point's connections and for its RSS to
    /// stop falling, and counts from the RSS it had before the first point (a point with
    /// fewer connections than an earlier one is then not measured).
    #[arg(long)]
    #[serde(default)]
    pub(crate) server_cmd: Option<String>,
    /// Every other `fanout` option applies to each point.
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) run: RunArgs,
    #[command(flatten)]
    #[serde(skip)]
    pub(crate) output: OutputArgs,
}

/// One grid point's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Point {
    pub(crate) conns: usize,
    pub(crate) rate: f64,
    pub(crate) size: usize,
    pub(crate) p99_us: u64,
    pub(crate) p999_us: u64,
    pub(crate) deliveries_per_second: f64,
    pub(crate) server_cpu_ns_per_delivery: Option<f64>,
    /// Server RSS growth per connection, counted as `SweepReport::memory` says; None when
    /// not measured (no server pid, RSS did not grow, or an earlier point held more).
    #[serde(default)]
    pub(crate) server_rss_bytes_per_conn: Option<f64>,
    pub(crate) client_cpu_ns_per_delivery: f64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) out_of_order: u64,
    pub(crate) failed_connects: u64,
    /// Why connections failed, by reason (which limit refused them, and what raises it).
    #[serde(default)]
    pub(crate) connect_failures: BTreeMap<String, u64>,
    /// A server limit that explains failed connections with no refusal to read.
    #[serde(default)]
    pub(crate) server_limit: Option<String>,
    /// How the bench spread the point's connections over source addresses by itself.
    #[serde(default)]
    pub(crate) spread: Option<SpreadReport>,
    /// Why the point could not be measured, if it could not.
    pub(crate) error: Option<String>,
    pub(crate) meets_slo: bool,
}

impl Point {
    fn from_report(conns: usize, rate: f64, size: usize, report: &FanoutReport) -> Self {
        Self {
            conns,
            rate,
            size,
            p99_us: report.latency_us.p99,
            p999_us: report.latency_us.p999,
            deliveries_per_second: report.deliveries.per_second,
            server_cpu_ns_per_delivery: report.server.as_ref().map(|s| s.cpu_ns_per_delivery),
            server_rss_bytes_per_conn: report
                .server
                .as_ref()
                .filter(|s| s.rss_note.is_none())
                .map(|s| s.rss_bytes_per_conn),
            client_cpu_ns_per_delivery: report.client.cpu_ns_per_delivery,
            lost: report.deliveries.lost,
            duplicated: report.deliveries.duplicated,
            out_of_order: report.deliveries.out_of_order,
            failed_connects: report.connect.failed,
            connect_failures: report.connect.failures.clone(),
            server_limit: report.connect.server_limit.clone(),
            spread: report.connect.spread.clone(),
            error: None,
            meets_slo: false,
        }
    }

    fn failed(conns: usize, rate: f64, size: usize, error: String) -> Self {
        Self {
            conns,
            rate,
            size,
            p99_us: 0,
            p999_us: 0,
            deliveries_per_second: 0.0,
            server_cpu_ns_per_delivery: None,
            server_rss_bytes_per_conn: None,
            client_cpu_ns_per_delivery: 0.0,
            lost: 0,
            duplicated: 0,
            out_of_order: 0,
            failed_connects: 0,
            connect_failures: BTreeMap::new(),
            server_limit: None,
            spread: None,
            error: Some(error),
            meets_slo: false,
        }
    }

    /// Whether this point meets the objective.
    fn passes(&self, slo_p99_us: u64) -> bool {
        self.error.is_none()
            && self.p99_us <= slo_p99_us
            && self.lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.failed_connects == 0
    }
}

/// Marks the points that meet the objective and returns the index of the largest: the most
/// offered deliveries per second (connections x rate), then the largest messages, then the
/// most connections.
pub(crate) fn largest_passing(points: &mut [Point], slo_p99_us: u64) -> Option<usize> {
    for point in points.iter_mut() {
        point.meets_slo = point.passes(slo_p99_us);
    }
    points
        .iter()
        .enumerate()
        .filter(|(_, point)| point.meets_slo)
        .max_by(|(_, a), (_, b)| {
            let load = |p: &Point| p.conns as f64 * p.rate;
            load(a)
                .total_cmp(&load(b))
                .then(a.size.cmp(&b.size))
                .then(a.conns.cmp(&b.conns))
        })
        .map(|(index, _)| index)
}

/// The `--json` output of `sweep`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SweepReport {
    pub(crate) mode: String,
    pub(crate) config: serde_json::Value,
    pub(crate) slo_p99_ms: f64,
    /// How memory per connection was measured.
    #[serde(default)]
    pub(crate) memory: String,
    pub(crate) points: Vec<Point>,
    /// Index into `points` of the largest point meeting the objective.
    pub(crate) best: Option<usize>,
    /// The full fan-out report of every measured point.
    pub(crate) runs: Vec<FanoutReport>,
}

/// Runs the sweep and prints the capacity table.
///
/// # Errors
/// An empty grid.
pub(crate) fn run(args: &SweepArgs) -> Result<()> {
    if args.conns.is_empty() || args.rate.is_empty() || args.size.is_empty() {
        bail!("--conns, --rate and --size need at least one value each");
    }
    let mut points = Vec::new();
    let mut runs = Vec::new();
    let mut reused = match &args.server_cmd {
        None if !args.run.server_pid.is_empty() => Some(Reused::new(&args.run.server_pid)?),
        _ => None,
    };
    let memory = memory_method(args, reused.as_ref());
    let grid: Vec<(usize, f64, usize)> = args
        .conns
        .iter()
        .flat_map(|&conns| {
            args.rate
                .iter()
                .flat_map(move |&rate| args.size.iter().map(move |&size| (conns, rate, size)))
        })
        .collect();
    for (index, &(conns, rate, size)) in grid.iter().enumerate() {
        if index > 0 {
            std::thread::sleep(Duration::from_secs_f64(args.pause));
        }
        if !args.output.quiet {
            eprintln!(
                "sweep point {}/{}: {conns} conns, {rate} msg/s, {size} B",
                index + 1,
                grid.len()
            );
        }
        let mut run = args.run.clone();
        let started = match &args.server_cmd {
            Some(command) => match Started::spawn(command, first_url(&run.url)) {
                Ok(started) => Some(started),
                Err(error) => {
                    points.push(Point::failed(conns, rate, size, format!("{error:#}")));
                    continue;
                }
            },
            None => None,
        };
        if let Some(started) = &started {
            run.server_pid = vec![started.pid()];
        }
        let baseline = match &mut reused {
            Some(reused) => Some(reused.before_point(conns)?),
            None => None,
        };
        let fanout = FanoutArgs {
            conns,
            rate,
            size,
            burst: 1,
            rss_baseline: baseline.clone().and_then(Result::ok),
            run,
            output: OutputArgs {
                quiet: args.output.quiet,
                ..OutputArgs::default()
            },
        };
        match measure(&fanout) {
            Ok(mut report) => {
                if let (Some(Err(note)), Some(server)) = (baseline, &mut report.server) {
                    server.rss_bytes_per_conn = 0.0;
                    server.rss_note = Some(note);
                }
                points.push(Point::from_report(conns, rate, size, &report));
                runs.push(report);
            }
            Err(error) => points.push(Point::failed(conns, rate, size, format!("{error:#}"))),
        }
        drop(started);
    }
    let slo_us = (args.slo_p99 * 1000.0) as u64;
    let best = largest_passing(&mut points, slo_us);
    let table = format!(
        "{}{}memory per connection: {memory}\n",
        format_sweep(&points, best, args.slo_p99),
        knees_text(&points)
    );
    let report = SweepReport {
        mode: "sweep".to_owned(),
        config: serde_json::to_value(args)?,
        slo_p99_ms: args.slo_p99,
        memory,
        points,
        best,
        runs,
    };
    if let Some(path) = &args.output.report {
        crate::report::write_sweep(path, &table, &report)?;
    }
    if args.output.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{table}");
    }
    Ok(())
}

/// How this sweep measures memory per connection, for its report.
fn memory_method(args: &SweepArgs, reused: Option<&Reused>) -> String {
    match (&args.server_cmd, reused.map(Reused::files_at_start)) {
        (Some(command), _) => format!(
            "server RSS growth per connection from a fresh server started for each point \
             (--server-cmd {command:?})"
        ),
        (None, Some(files)) => format!(
            "server RSS growth per connection over the RSS the --server-pid server had before \
             the first point (anything it kept from before the sweep counts as baseline), \
             each point starting once the server held its first {files} descriptors again \
             (the previous point's connections closed) and its RSS had stopped falling; a \
             point with fewer connections than an earlier one is not measured (the server \
             keeps memory they touched); --server-cmd measures a fresh server at every point"
        ),
        (None, None) => "not measured (no --server-pid or --server-cmd)".to_owned(),
    }
}

/// The capacity table.
fn format_sweep(points: &[Point], best: Option<usize>, slo_p99_ms: f64) -> String {
    let mut out = format!(
        "{:>8} {:>8} {:>7} {:>10} {:>10} {:>13} {:>12} {:>12} {:>10} {:>8}  {}\n",
        "conns",
        "msg/s",
        "size",
        "p99",
        "p99.9",
        "deliveries/s",
        "server ns/d",
        "client ns/d",
        "rss B/conn",
        "lost",
        "slo"
    );
    for (index, point) in points.iter().enumerate() {
        if let Some(error) = &point.error {
            out.push_str(&format!(
                "{:>8} {:>8} {:>7}  error: {error}\n",
                point.conns, point.rate, point.size
            ));
            continue;
        }
        out.push_str(&format!(
            "{:>8} {:>8} {:>7} {:>10} {:>10} {:>13.0} {:>12} {:>12.0} {:>10} {:>8}  {}\n",
            point.conns,
            point.rate,
            point.size,
            human_us(point.p99_us),
            human_us(point.p999_us),
            point.deliveries_per_second,
            point
                .server_cpu_ns_per_delivery
                .map_or("-".to_owned(), |ns| format!("{ns:.0}")),
            point.client_cpu_ns_per_delivery,
            point
                .server_rss_bytes_per_conn
                .map_or("-".to_owned(), |bytes| format!("{bytes:.0}")),
            point.lost,
            match (point.meets_slo, best == Some(index)) {
                (true, true) => "ok  <- largest passing",
                (true, false) => "ok",
                (false, _) => "MISS",
            }
        ));
        if let Some(line) = point
            .spread
            .as_ref()
            .and_then(|s| s.announce(point.conns as u64))
        {
            out.push_str(&format!("{:>8}  {line}\n", ""));
        }
        for (reason, count) in &point.connect_failures {
            out.push_str(&format!(
                "{:>8}  {count} connections failed: {reason}\n",
                ""
            ));
        }
        if let Some(limit) = &point.server_limit {
            out.push_str(&format!("{:>8}  because {limit}\n", ""));
        }
    }
    match best {
        Some(index) => {
            let point = &points[index];
            out.push_str(&format!(
                "largest point meeting p99 <= {slo_p99_ms} ms with nothing lost: {} conns, \
                 {} msg/s, {} B ({:.0} deliveries/s, p99 {})\n",
                point.conns,
                point.rate,
                point.size,
                point.deliveries_per_second,
                human_us(point.p99_us)
            ));
        }
        None => out.push_str(&format!(
            "no point meets p99 <= {slo_p99_ms} ms with nothing lost\n"
        )),
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn point(conns: usize, rate: f64, size: usize, p99_us: u64, lost: u64) -> Point {
        Point {
            p99_us,
            lost,
            ..Point::failed(conns, rate, size, String::new())
        }
    }

    fn ok(mut point: Point) -> Point {
        point.error = None;
        point
    }

    #[test]
    fn slo_search_picks_the_largest_passing_point() {
        let mut points = vec![
            ok(point(1000, 20.0, 64, 2_000, 0)),
            ok(point(10_000, 20.0, 64, 40_000, 0)),
            ok(point(18_000, 20.0, 64, 120_000, 0)), // too slow
            ok(point(20_000, 20.0, 64, 10_000, 3)),  // lost messages
            ok(point(10_000, 20.0, 1024, 45_000, 0)),
            point(50_000, 20.0, 64, 0, 0), // could not run
        ];
        assert_eq!(largest_passing(&mut points, 50_000), Some(4));
        assert_eq!(
            points.iter().map(|p| p.meets_slo).collect::<Vec<_>>(),
            [true, true, false, false, true, false]
        );
        assert_eq!(largest_passing(&mut points, 1_000), None);
        assert_eq!(largest_passing(&mut points, 2_000), Some(0));
        let table = format_sweep(&points, Some(0), 2.0);
        assert!(table.contains("largest point") && table.contains("error"));
    }

    #[test]
    fn counts_a_failed_connect_as_missing_the_objective() {
        let mut failing = ok(point(1000, 20.0, 64, 1_000, 0));
        failing.failed_connects = 1;
        assert_eq!(largest_passing(&mut [failing], 50_000), None);
    }
}
