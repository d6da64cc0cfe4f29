//! The clients of the Redis Cluster tests: steady publishers that retry refusals,
//! subscribers that read across epochs or resume on another node, and the check that
//! every acknowledged message arrived once and in order.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

/// What a subscriber saw on one channel: `(epoch, seq, data)` per message, in order.
pub(crate) type Seen = HashMap<String, Vec<(String, u64, String)>>;

/// Reads until every channel has `want` messages in its latest epoch or `limit` passes.
/// A `subscribed` notice with seq 0 is a new epoch (a rollback): what follows counts
/// from there. A `gap` fails the test: nothing here may be lost from the streams.
pub(crate) async fn read_all(
    ws: &mut Ws,
    epochs: &mut HashMap<String, String>,
    want: usize,
    limit: Duration,
) -> Seen {
    let deadline = Instant::now() + limit;
    let mut seen: Seen = HashMap::new();
    let done = |seen: &Seen, epochs: &HashMap<String, String>| {
        epochs.keys().all(|c| {
            seen.get(c).is_some_and(|m| {
                m.iter()
                    .filter(|(e, _, _)| Some(e) == epochs.get(c))
                    .count()
                    >= want
            })
        })
    };
    while !done(&seen, epochs) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(Event::Text(text)) = next_event(ws, left).await else {
            break;
        };
        let v: Value = serde_json::from_str(&text).expect("JSON");
        let channel = v["channel"].as_str().unwrap_or_default().to_string();
        match v["type"].as_str() {
            Some("message") => {
                let epoch = epochs.get(&channel).cloned().unwrap_or_default();
                seen.entry(channel).or_default().push((
                    epoch,
                    v["seq"].as_u64().expect("seq"),
                    v["data"].to_string(),
                ));
            }
            Some("subscribed") if v["seq"] == 0 => {
                epochs.insert(channel, v["epoch"].as_str().expect("epoch").into());
            }
            _ => panic!("unexpected frame {text}"),
        }
    }
    seen
}

/// Subscribes to every channel on one connection; the epochs the node answered with.
pub(crate) async fn subscribe_all(ws: &mut Ws, channels: &[String]) -> HashMap<String, String> {
    let mut epochs = HashMap::new();
    for (i, channel) in channels.iter().enumerate() {
        let reply = subscribe(ws, channel, i as u64 + 1).await;
        epochs.insert(
            channel.clone(),
            reply["epoch"].as_str().expect("epoch").into(),
        );
    }
    epochs
}

/// What one steady publisher saw: acknowledged `(seq, data, when)`, refusals, and when
/// the refusals were.
#[derive(Default)]
pub(crate) struct Steady {
    pub(crate) acked: Vec<(u64, String, Instant)>,
    pub(crate) refused: Vec<Instant>,
}

/// Publishes `count` messages to `channel`, each retried while refused `unavailable`;
/// every attempt carries distinct data, so a refused publish that Redis stored anyway
/// cannot pass for the acknowledged retry.
pub(crate) async fn publish_steadily(
    addr: SocketAddr,
    channel: String,
    count: u64,
    progress: Arc<AtomicU64>,
) -> Steady {
    let mut ws = connect_ws(addr).await;
    let mut steady = Steady::default();
    let mut id = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    for i in 0..count {
        loop {
            assert!(
                Instant::now() < deadline,
                "{channel}: {i} of {count} acknowledged in 90 s; never served again?"
            );
            id += 1;
            let data = json!({"i": i, "try": id}).to_string();
            send_text(
                &mut ws,
                &format!(r#"{{"type":"publish","channel":"{channel}","data":{data},"id":{id}}}"#),
            )
            .await;
            let v = recv_json(&mut ws).await;
            if v["type"] == "ack" {
                steady
                    .acked
                    .push((v["seq"].as_u64().expect("seq"), data, Instant::now()));
                progress.fetch_add(1, Ordering::Relaxed);
                break;
            }
            assert_eq!(v["code"], "unavailable", "{v}");
            steady.refused.push(Instant::now());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    steady
}

/// Reads until every acknowledged message of every channel arrived (30 s at most), then
/// checks: in seq order within each epoch, no duplicates, and every acknowledged message
/// there, except, when `lost_before` is given, ones acknowledged before it that a new
/// epoch announced lost (a failover's rollback).
pub(crate) async fn assert_delivered(
    n: usize,
    ws: &mut Ws,
    epochs: &mut HashMap<String, String>,
    channels: &[String],
    results: &[Steady],
    lost_before: Option<Instant>,
) {
    let mut seen: Seen = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let all_seen = |seen: &Seen| {
        channels
            .iter()
            .zip(results)
            .all(|(channel, result)| seen.get(channel).map_or(0, Vec::len) >= result.acked.len())
    };
    while !all_seen(&seen) && Instant::now() < deadline {
        let more = read_all(ws, epochs, usize::MAX, Duration::from_millis(500)).await;
        for (channel, mut list) in more {
            seen.entry(channel).or_default().append(&mut list);
        }
    }
    for (channel, result) in channels.iter().zip(results) {
        let got = seen.remove(channel).unwrap_or_default();
        let mut last: Option<(&str, u64)> = None;
        for (epoch, seq, _) in &got {
            if let Some((last_epoch, last_seq)) = last
                && last_epoch == epoch
            {
                assert!(*seq > last_seq, "subscriber {n}, {channel}: in order, once");
            }
            last = Some((epoch, *seq));
        }
        let epochs_seen: BTreeSet<&str> = got.iter().map(|(e, _, _)| e.as_str()).collect();
        let data: HashSet<&str> = got.iter().map(|(_, _, d)| d.as_str()).collect();
        assert_eq!(
            data.len(),
            got.len(),
            "subscriber {n}, {channel}: no duplicates"
        );
        let missing: Vec<&(u64, String, Instant)> = result
            .acked
            .iter()
            .filter(|(_, d, _)| !data.contains(d.as_str()))
            .collect();
        if missing.is_empty() {
            continue;
        }
        let announced = lost_before.is_some_and(|before| {
            epochs_seen.len() > 1 && missing.iter().all(|(_, _, at)| *at < before)
        });
        assert!(
            announced,
            "subscriber {n}, {channel}: acknowledged messages lost without a new epoch: {missing:?}"
        );
        eprintln!(
            "subscriber {n}, {channel}: {} acknowledged messages rolled back by the failover, announced as a new epoch",
            missing.len()
        );
    }
}

/// Publishes `count` messages to `channel` one after the other; their mean round trip.
pub(crate) async fn round_trips(addr: SocketAddr, channel: &str, count: u64) -> Duration {
    let mut ws = connect_ws(addr).await;
    let started = Instant::now();
    for i in 0..count {
        publish_raw(&mut ws, channel, &json!({"i": i}).to_string(), i + 1).await;
    }
    started.elapsed() / count as u32
}

/// A subscriber of `channel` on `first` that, when that node dies, resumes on `fallback`
/// with `since` and `epoch`; everything it received, in order.
pub(crate) async fn resuming_subscriber(
    first: SocketAddr,
    fallback: SocketAddr,
    channel: String,
    total: usize,
) -> Vec<(u64, String)> {
    let mut ws = connect_ws(first).await;
    let epoch = subscribe(&mut ws, &channel, 1).await["epoch"].clone();
    let mut got = Vec::new();
    let mut resumed = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < total {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(&mut ws, left).await {
            Some(Event::Text(text)) => {
                let v: Value = serde_json::from_str(&text).expect("JSON");
                match v["type"].as_str() {
                    Some("message") => {
                        got.push((v["seq"].as_u64().expect("seq"), v["data"].to_string()));
                    }
                    Some("subscribed") => assert_eq!(v["epoch"], epoch, "{v}"),
                    _ => panic!("unexpected frame {text}"),
                }
            }
            Some(Event::Close(_) | Event::Ended(_)) if !resumed => {
                resumed = true;
                ws = connect_ws(fallback).await;
                let since = got.last().map_or(0, |(s, _)| *s);
                let resume = json!({"type":"subscribe","channel":&channel,"since":since,"epoch":&epoch,"id":2});
                send_json(&mut ws, &resume).await;
            }
            other => panic!("subscriber got {other:?} after {} messages", got.len()),
        }
    }
    assert!(resumed, "the node died under this subscriber");
    got
}
