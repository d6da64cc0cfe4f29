//! `GET /metrics` (Prometheus text format 0.0.4) and `GET /api/stats` (JSON).

use std::fmt::Write as _;

use crate::config::Io;
use crate::metrics::{LATENCY_BUCKETS_US, REJECT_STATUSES, Snapshot, TRANSPORTS};

/// `io` is the backend the shards run on (resolved by `serve`, never `auto` there).
pub fn prometheus(s: &Snapshot, io: Io) -> String {
    let t = &s.total;
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in lines {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |v: u64| vec![(String::new(), v)];
    metric(
        "herald_io_backend",
        "gauge",
        "The IO backend the shards run on (1 for the one in use).",
        &[(format!("{{backend=\"{}\"}}", io.name()), 1)],
    );
    metric(
        "herald_connections",
        "gauge",
        "Open connections by transport.",
        &TRANSPORTS
            .iter()
            .enumerate()
            .map(|(i, (_, name))| (format!("{{transport=\"{name}\"}}"), t.connections[i]))
            .collect::<Vec<_>>(),
    );
    metric(
        "herald_subscriptions",
        "gauge",
        "Active subscriptions.",
        &one(t.subscriptions),
    );
    metric(
        "herald_channels",
        "gauge",
        "Channels with subscribers or live history (all homes).",
        &one(t.channels_homed),
    );
    metric(
        "herald_connections_accepted_total",
        "counter",
        "Accepted TCP connections.",
        &one(t.accepted_total),
    );
    metric(
        "herald_messages_in_total",
        "counter",
        "WebSocket messages received from clients.",
        &one(t.messages_in_total),
    );
    metric(
        "herald_publishes_total",
        "counter",
        "Messages published (ordered by their channel's home).",
        &one(t.publishes_total),
    );
    metric(
        "herald_messages_out_total",
        "counter",
        "Frames and events queued to clients.",
        &one(t.messages_out_total),
    );
    metric(
        "herald_bytes_out_total",
        "counter",
        "Bytes written to sockets.",
        &one(t.bytes_out_total),
    );
    metric(
        "herald_deliveries_total",
        "counter",
        "Published messages queued to a subscriber.",
        &one(t.deliveries_total),
    );
    metric(
        "herald_slow_consumer_closes_total",
        "counter",
        "Connections closed with 4008 because their outbound queue was full.",
        &one(t.slow_consumer_closes_total),
    );
    metric(
        "herald_messages_shed_total",
        "counter",
        "Messages shed from slow consumers by a drop-oldest or conflate policy (each announced by a gap notice).",
        &one(t.messages_shed_total),
    );
    metric(
        "herald_compressed_frames_total",
        "counter",
        "Frames sent compressed with permessage-deflate (a shared frame once per subscriber).",
        &one(t.compressed_frames_total),
    );
    metric(
        "herald_compression_saved_bytes_total",
        "counter",
        "Bytes compression kept off the wire: plain frame size minus compressed frame size.",
        &one(t.compression_saved_bytes_total),
    );
    metric(
        "herald_deflate_nanoseconds_total",
        "counter",
        "CPU time spent compressing outgoing messages (a shared frame once per publish).",
        &one(t.deflate_ns_total),
    );
    metric(
        "herald_inflate_nanoseconds_total",
        "counter",
        "CPU time spent decoding compressed client messages, inflating included.",
        &one(t.inflate_ns_total),
    );
    metric(
        "herald_rejected_requests_total",
        "counter",
        "Requests refused before an upgrade or on the API, by status.",
        &REJECT_STATUSES
            .iter()
            .zip(t.rejected_total)
            .map(|(status, v)| (format!("{{status=\"{status}\"}}"), v))
            .collect::<Vec<_>>(),
    );
    metric(
        "herald_shard_busy_seconds_total",
        "counter",
        "Time each shard spent working rather than waiting in the poller (rate = utilisation).",
        &[],
    );
    for (i, shard) in s.per_shard.iter().enumerate() {
        let _ = writeln!(
            out,
            "herald_shard_busy_seconds_total{{shard=\"{i}\"}} {:.6}",
            shard.busy_ns_total as f64 / 1e9
        );
    }
    let _ = writeln!(
        out,
        "# HELP herald_shard_outbound_queue_peak_bytes The most bytes one connection of each shard has had queued for sending.\n# TYPE herald_shard_outbound_queue_peak_bytes gauge"
    );
    for (i, shard) in s.per_shard.iter().enumerate() {
        let _ = writeln!(
            out,
            "herald_shard_outbound_queue_peak_bytes{{shard=\"{i}\"}} {}",
            shard.outbound_queue_peak_bytes
        );
    }
    let _ = writeln!(
        out,
        "# HELP herald_publish_flush_seconds From a publish being ordered to its frame being written, per shard.\n# TYPE herald_publish_flush_seconds histogram"
    );
    let mut cumulative = 0;
    for (i, bound) in LATENCY_BUCKETS_US.iter().enumerate() {
        cumulative += t.publish_flush_buckets[i];
        let _ = writeln!(
            out,
            "herald_publish_flush_seconds_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    cumulative += t.publish_flush_buckets[LATENCY_BUCKETS_US.len()];
    let _ = writeln!(
        out,
        "herald_publish_flush_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
    );
    let _ = writeln!(
        out,
        "herald_publish_flush_seconds_sum {:.6}\nherald_publish_flush_seconds_count {cumulative}",
        t.publish_flush_sum_us as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "# HELP herald_uptime_seconds Seconds since start.\n# TYPE herald_uptime_seconds gauge\nherald_uptime_seconds {:.3}",
        s.uptime.as_secs_f64()
    );
    out
}

pub fn stats_json(s: &Snapshot) -> String {
    let t = &s.total;
    let connections: u64 = t.connections.iter().sum();
    let by_transport: Vec<String> = TRANSPORTS
        .iter()
        .enumerate()
        .map(|(i, (_, name))| format!("\"{name}\":{}", t.connections[i]))
        .collect();
    format!(
        concat!(
            "{{\"connections\":{},\"connections_by_transport\":{{{}}},\"subscriptions\":{},",
            "\"channels\":{},\"messages_in_total\":{},\"publishes_total\":{},",
            "\"deliveries_total\":{},\"messages_out_total\":{},\"bytes_out_total\":{},",
            "\"slow_consumer_closes_total\":{},\"shards\":{},\"uptime_ms\":{}}}"
        ),
        connections,
        by_transport.join(","),
        t.subscriptions,
        t.channels_homed,
        t.messages_in_total,
        t.publishes_total,
        t.deliveries_total,
        t.messages_out_total,
        t.bytes_out_total,
        t.slow_consumer_closes_total,
        s.per_shard.len(),
        s.uptime.as_millis()
    )
}
