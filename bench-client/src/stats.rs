//! Measurements: latency histograms (hdrhistogram, µs, 3 significant figures), their wire form
//! between processes, percentiles, timelines, clocks, and the CPU/RSS figures read from /proc.

use std::fmt::Write as _;

use anyhow::{Context as _, Result};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use serde::{Deserialize, Serialize};

/// A latency histogram in microseconds.
pub(crate) type Hist = Histogram<u64>;

/// Highest latency recorded without saturating: one hour, in µs.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// An empty latency histogram: 1 µs to 1 h at 3 significant figures.
#[must_use]
pub(crate) fn new_histogram() -> Hist {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// The histogram in hdrhistogram's V2 serialisation, base64-encoded for a JSON line.
#[must_use]
pub(crate) fn encode_histogram(hist: &Hist) -> String {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(hist, &mut bytes)
        .expect("serialising into a Vec cannot fail");
    BASE64.encode(bytes)
}

/// Inverse of [`encode_histogram`].
///
/// # Errors
/// Bad base64 or a corrupt serialisation.
pub(crate) fn decode_histogram(text: &str) -> Result<Hist> {
    let bytes = BASE64.decode(text).context("histogram is not base64")?;
    let hist: Hist = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|error| anyhow::anyhow!("corrupt histogram: {error:?}"))?;
    Ok(hist)
}

/// Adds `source` into `into` (both in µs with the same bounds).
pub(crate) fn merge(into: &mut Hist, source: &Hist) {
    into.add(source).expect("histograms share bounds");
}

/// The headline latency figures, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct LatencySummary {
    pub(crate) p50: u64,
    pub(crate) p90: u64,
    pub(crate) p99: u64,
    pub(crate) p999: u64,
    pub(crate) p9999: u64,
    pub(crate) max: u64,
    pub(crate) mean: f64,
    pub(crate) count: u64,
}

impl LatencySummary {
    /// Summarises `hist`; all zero when it is empty.
    #[must_use]
    pub(crate) fn of(hist: &Hist) -> Self {
        if hist.is_empty() {
            return Self::default();
        }
        Self {
            p50: hist.value_at_quantile(0.5),
            p90: hist.value_at_quantile(0.9),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            p9999: hist.value_at_quantile(0.9999),
            max: hist.max(),
            mean: (hist.mean() * 10.0).round() / 10.0,
            count: hist.len(),
        }
    }
}

/// One point of the latency percentile curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct CurvePoint {
    /// The quantile, 0 to 1.
    pub(crate) q: f64,
    /// Latency at that quantile, µs.
    pub(crate) us: u64,
}

/// The percentile curve at quantiles spaced evenly in "number of nines", from the median to
/// 99.999 %, plus the maximum.
#[must_use]
pub(crate) fn percentile_curve(hist: &Hist) -> Vec<CurvePoint> {
    if hist.is_empty() {
        return Vec::new();
    }
    let mut curve: Vec<CurvePoint> = (0..=20)
        .map(|step| {
            // nines from 0.3 (q = 0.5) to 5 (q = 0.99999)
            let half = std::f64::consts::LOG10_2;
            let nines = half + f64::from(step) * (5.0 - half) / 20.0;
            let q = 1.0 - 10f64.powf(-nines);
            let q = (q * 1e6).round() / 1e6;
            CurvePoint {
                q,
                us: hist.value_at_quantile(q),
            }
        })
        .collect();
    curve.push(CurvePoint {
        q: 1.0,
        us: hist.max(),
    });
    curve
}

/// One second of the run, by receive time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct TimelinePoint {
    /// Seconds since the first scheduled publish (start of the bucket).
    pub(crate) t: f64,
    /// Deliveries received in this second.
    pub(crate) deliveries: u64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
}

/// Per-second latency histograms, indexed by receive time relative to a start instant.
#[derive(Debug, Clone, Default)]
pub(crate) struct Timeline {
    pub(crate) buckets: Vec<Hist>,
}

impl Timeline {
    /// Width of a bucket in nanoseconds.
    pub(crate) const BUCKET_NS: u64 = 1_000_000_000;

    /// Records `latency_us` for a delivery received `since_start_ns` after the start.
    pub(crate) fn record(&mut self, since_start_ns: u64, latency_us: u64) {
        let index = (since_start_ns / Self::BUCKET_NS) as usize;
        if index >= self.buckets.len() {
            self.buckets.resize_with(index + 1, new_histogram);
        }
        self.buckets[index].saturating_record(latency_us);
    }

    /// Adds another timeline bucket by bucket.
    pub(crate) fn merge(&mut self, other: &Self) {
        if other.buckets.len() > self.buckets.len() {
            self.buckets.resize_with(other.buckets.len(), new_histogram);
        }
        for (into, source) in self.buckets.iter_mut().zip(&other.buckets) {
            merge(into, source);
        }
    }

    /// Wire form: one encoded histogram per bucket.
    #[must_use]
    pub(crate) fn encode(&self) -> Vec<String> {
        self.buckets.iter().map(encode_histogram).collect()
    }

    /// Inverse of [`Timeline::encode`].
    ///
    /// # Errors
    /// A corrupt bucket.
    pub(crate) fn decode(encoded: &[String]) -> Result<Self> {
        let buckets = encoded
            .iter()
            .map(|text| decode_histogram(text))
            .collect::<Result<_>>()?;
        Ok(Self { buckets })
    }

    /// The points for the report.
    #[must_use]
    pub(crate) fn points(&self) -> Vec<TimelinePoint> {
        self.buckets
            .iter()
            .enumerate()
            .map(|(index, hist)| {
                let summary = LatencySummary::of(hist);
                TimelinePoint {
                    t: index as f64 * (Self::BUCKET_NS as f64 / 1e9),
                    deliveries: hist.len(),
                    p50_us: summary.p50,
                    p99_us: summary.p99,
                }
            })
            .collect()
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine, so a
/// timestamp taken by the publisher can be compared with one taken by a worker process.
#[must_use]
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always available on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time (user + system) used so far by this process (`who = RUSAGE_SELF`), in ns.
/// Each worker reports its own, so the coordinator adds them up per phase.
fn rusage_cpu_ns(who: libc::c_int) -> u64 {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage and `who` is RUSAGE_SELF or RUSAGE_CHILDREN.
    let rc = unsafe { libc::getrusage(who, &mut usage) };
    if rc != 0 {
        return 0;
    }
    let tv_ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000;
    tv_ns(usage.ru_utime) + tv_ns(usage.ru_stime)
}

/// CPU time of this process so far, ns.
#[must_use]
pub(crate) fn self_cpu_ns() -> u64 {
    rusage_cpu_ns(libc::RUSAGE_SELF)
}

/// CPU time and resident memory of a set of processes at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ProcSample {
    pub(crate) cpu_ns: u64,
    pub(crate) rss_bytes: u64,
}

/// Reads utime + stime from /proc/PID/stat and VmRSS from /proc/PID/status for each pid, summed.
///
/// # Errors
/// A pid that does not exist (any more) or an unreadable /proc entry.
pub(crate) fn sample_pids(pids: &[u32]) -> Result<ProcSample> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as u64 } else { 100 };
    let mut sample = ProcSample::default();
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat (is --server-pid right?)"))?;
        sample.cpu_ns += parse_stat_cpu_ticks(&stat)
            .with_context(|| format!("parsing /proc/{pid}/stat"))?
            * (1_000_000_000 / ticks);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        sample.rss_bytes += parse_status_rss_bytes(&status).unwrap_or(0);
    }
    Ok(sample)
}

/// utime + stime in clock ticks from the text of /proc/PID/stat (fields 14 and 15; the command
/// name in field 2 may contain spaces and parentheses, so count from the last `)`).
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_ascii_whitespace();
    // after_comm starts at field 3 (state); utime is field 14, i.e. the 12th here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS in bytes from the text of /proc/PID/status.
fn parse_status_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Formats `rows` as a two-column table with the labels aligned.
#[must_use]
pub(crate) fn format_table(title: &str, rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    let mut out = format!("{title}\n");
    for (label, value) in rows {
        let _ = writeln!(out, "  {label:<width$}  {value}");
    }
    out
}

/// µs as a short human string ("850 µs", "12.3 ms", "1.20 s").
#[must_use]
pub(crate) fn human_us(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist_of(values: &[u64]) -> Hist {
        let mut hist = new_histogram();
        for &value in values {
            hist.record(value).unwrap();
        }
        hist
    }

    #[test]
    fn merged_histograms_count_every_sample_with_combined_percentiles() {
        let low = hist_of(&[100; 900]);
        let high = hist_of(&[10_000; 100]);
        let mut merged = new_histogram();
        merge(&mut merged, &low);
        merge(&mut merged, &high);
        let summary = LatencySummary::of(&merged);
        assert_eq!(summary.count, 1000);
        assert_eq!(summary.p50, 100);
        assert_eq!(summary.p90, 100);
        assert!((10_000..=10_010).contains(&summary.p99), "{}", summary.p99);
        assert!((10_000..=10_010).contains(&summary.max));
    }

    #[test]
    fn histogram_survives_the_wire_between_processes() {
        let hist = hist_of(&[1, 5, 77, 1234, 99_999, 3_000_000]);
        let decoded = decode_histogram(&encode_histogram(&hist)).unwrap();
        assert_eq!(decoded, hist);
        assert!(decode_histogram("not base64!").is_err());
        assert!(decode_histogram("AAAA").is_err());
    }

    #[test]
    fn timeline_merges_bucket_by_bucket() {
        let mut a = Timeline::default();
        a.record(100, 10);
        a.record(1_500_000_000, 20);
        let mut b = Timeline::default();
        b.record(2_100_000_000, 30);
        b.record(0, 40);
        let decoded = Timeline::decode(&b.encode()).unwrap();
        a.merge(&decoded);
        let points = a.points();
        assert_eq!(points.len(), 3);
        assert_eq!(
            points.iter().map(|p| p.deliveries).collect::<Vec<_>>(),
            [2, 1, 1]
        );
        assert_eq!(points[2].t, 2.0);
        assert_eq!(points[1].p50_us, 20);
    }

    #[test]
    fn percentile_curve_is_monotonic_and_ends_at_max() {
        let hist = hist_of(&(1..=100_000).collect::<Vec<_>>());
        let curve = percentile_curve(&hist);
        assert_eq!(curve.first().unwrap().q, 0.5);
        assert_eq!(curve.last().unwrap().q, 1.0);
        assert!(
            curve
                .windows(2)
                .all(|w| w[0].q < w[1].q && w[0].us <= w[1].us)
        );
        assert!(percentile_curve(&new_histogram()).is_empty());
    }

    #[test]
    fn parses_proc_stat_with_awkward_command_names() {
        let stat = "1234 (we ird) name)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 \
                    3 0 12345 1000000 500";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(300));
        let status = "Name:\therald\nVmPeak:\t  9000 kB\nVmRSS:\t    4096 kB\n";
        assert_eq!(parse_status_rss_bytes(status), Some(4096 * 1024));
        let own = sample_pids(&[std::process::id()]).unwrap();
        assert!(own.rss_bytes > 0);
    }
}
