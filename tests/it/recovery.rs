//! History and recovery (DESIGN.md "Ordering and history", reliability.md group R):
//! `subscribe` with `since` + `epoch` replays what was missed and continues live with no
//! gap and no duplicate while publishers keep publishing over `/ws` and HTTP; a `since`
//! that history cannot serve, from another epoch or ahead of the channel is a
//! `history_gap`; a restart begins a new epoch. Real binary, two shards.

use crate::support;
use crate::support_http;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{Value, json};
use support::*;
use support_http::HttpConn;
use tokio_tungstenite::tungstenite::Message;

const API_KEY: &str = "recovery-key";

/// The home shard of a channel as DESIGN.md describes it (FNV-1a of the name, mod the
/// shard count), to pick channels homed on every shard.
fn home_of(channel: &str, shards: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in channel.as_bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash % shards
}

/// Sends a subscribe with optional `since`/`epoch`.
async fn send_subscribe(
    ws: &mut Ws,
    channel: &str,
    since: Option<u64>,
    epoch: Option<&str>,
    id: u64,
) {
    let mut v = json!({"type":"subscribe","channel":channel,"id":id});
    if let Some(since) = since {
        v["since"] = json!(since);
    }
    if let Some(epoch) = epoch {
        v["epoch"] = json!(epoch);
    }
    send_json(ws, &v).await;
}

/// Subscribes with `since`/`epoch` and expects a `history_gap` error; returns it.
async fn expect_gap(ws: &mut Ws, channel: &str, since: u64, epoch: Option<&str>, id: u64) -> Value {
    send_subscribe(ws, channel, Some(since), epoch, id).await;
    let v = recv_json(ws).await;
    assert_eq!(
        v["type"], "error",
        "since {since} epoch {epoch:?}: expected history_gap, got {v}"
    );
    assert_eq!(
        v["code"], "history_gap",
        "since {since} epoch {epoch:?}: {v}"
    );
    assert_eq!(v["channel"], channel, "history_gap names the channel: {v}");
    assert_eq!(v["id"], id, "history_gap echoes the id: {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "history_gap has a message: {v}"
    );
    v
}

/// Subscribes with `since`/`epoch` and expects the replay of `since+1..=latest` and then
/// `subscribed` with `seq` = latest; returns (replayed seqs, subscribed reply).
async fn expect_replay(
    ws: &mut Ws,
    channel: &str,
    since: u64,
    epoch: Option<&str>,
    id: u64,
) -> (Vec<u64>, Value) {
    send_subscribe(ws, channel, Some(since), epoch, id).await;
    let mut seqs = Vec::new();
    loop {
        let v = recv_json(ws).await;
        match v["type"].as_str() {
            Some("message") => {
                assert_eq!(v["channel"], channel, "replay of another channel: {v}");
                seqs.push(v["seq"].as_u64().expect("integer seq"));
            }
            Some("subscribed") => {
                assert_eq!(v["channel"], channel, "{v}");
                assert_eq!(v["id"], id, "{v}");
                let latest = v["seq"].as_u64().expect("integer seq");
                assert_eq!(
                    seqs,
                    (since + 1..=latest).collect::<Vec<_>>(),
                    "since {since}: replay must be exactly {}..={latest} before `subscribed`",
                    since + 1
                );
                return (seqs, v);
            }
            _ => panic!("since {since}: expected replay then subscribed, got {v}"),
        }
    }
}

/// Publishes `n` messages `{"i":k}` over `/ws` and returns the last seq.
async fn publish_n(ws: &mut Ws, channel: &str, n: u64) -> u64 {
    let mut last = 0;
    for k in 0..n {
        last = publish_raw(ws, channel, &format!(r#"{{"i":{k}}}"#), 1000 + k).await;
    }
    last
}

async fn epoch_of(addr: std::net::SocketAddr, channel: &str) -> String {
    let mut ws = connect_ws(addr).await;
    let v = subscribe(&mut ws, channel, 1).await;
    v["epoch"]
        .as_str()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| panic!("subscribed without an epoch string: {v}"))
        .to_owned()
}

// ---------------------------------------------------------------------------------------
// The seam under concurrent publishing
// ---------------------------------------------------------------------------------------

const CHANNELS: usize = 8;
const ROUNDS: u64 = 150;
const SUBSCRIBERS: usize = 4;

fn channel_name(c: usize) -> String {
    format!("rec-{c}")
}

/// What one subscriber saw: per channel, (seq, data) in arrival order.
type Seen = Vec<Vec<(u64, Value)>>;

/// xorshift64, so every run reproduces the same timing choices per subscriber.
struct Rng(u64);
impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// Applies one frame to a subscriber's state: a message must be the next seq of its
/// channel; a `subscribed` must report exactly the last seq delivered (the replay ended
/// there). Returns the channel index of a `subscribed`.
fn apply(v: &Value, sub: usize, epoch: &str, last: &mut [u64], seen: &mut Seen) -> Option<usize> {
    let channel = v["channel"].as_str().unwrap_or_default();
    let c: usize = channel
        .strip_prefix("rec-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("subscriber {sub}: frame for an unknown channel: {v}"));
    let seq = v["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer seq: {v}"));
    match v["type"].as_str() {
        Some("message") => {
            assert!(
                seq == last[c] + 1,
                "subscriber {sub}, {channel}: after seq {} got seq {seq} ({}): {v}",
                last[c],
                if seq <= last[c] {
                    "duplicate or reorder"
                } else {
                    "gap"
                }
            );
            last[c] = seq;
            seen[c].push((seq, v["data"].clone()));
            None
        }
        Some("subscribed") => {
            assert_eq!(
                v["epoch"], epoch,
                "subscriber {sub}: epoch changed within one run: {v}"
            );
            assert_eq!(
                seq, last[c],
                "subscriber {sub}, {channel}: `subscribed` reports seq {seq} but the replay ended at {}: {v}",
                last[c]
            );
            Some(c)
        }
        _ => panic!("subscriber {sub}: unexpected frame {v}"),
    }
}

/// Subscribes to every channel (with `since`/`epoch` after the first time) and reads
/// until every `subscribed` arrived, checking each frame on the way.
async fn subscribe_all(
    ws: &mut Ws,
    sub: usize,
    resume: bool,
    epoch: &str,
    last: &mut [u64],
    seen: &mut Seen,
) {
    for (c, &since) in last.iter().enumerate() {
        let text = if resume {
            json!({"type":"subscribe","channel":channel_name(c),"since":since,"epoch":epoch,"id":c})
        } else {
            json!({"type":"subscribe","channel":channel_name(c),"id":c})
        };
        ws.feed(Message::text(text.to_string()))
            .await
            .expect("send subscribe");
    }
    ws.flush().await.expect("flush subscribes");
    let mut pending = CHANNELS;
    while pending > 0 {
        let v = recv_json(ws).await;
        if v["type"] == "error" {
            panic!("subscriber {sub}: resubscribe refused (history must cover the outage): {v}");
        }
        if let Some(c) = apply(&v, sub, epoch, last, seen) {
            assert_eq!(v["id"], c, "subscribed echoes the id: {v}");
            pending -= 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resubscribe_with_since_under_concurrent_ws_and_http_publishing_loses_and_repeats_nothing()
{
    let started = Instant::now();
    let mut server = Server::start(&[
        "--threads",
        "2",
        "--api-key",
        API_KEY,
        "--history-size",
        "100000",
        // One /ws publisher sends ~1,000 messages a second here.
        "--max-messages-per-second",
        "100000",
    ]);
    let addr = server.addr();
    let names: Vec<String> = (0..CHANNELS).map(channel_name).collect();
    for home in 0..2 {
        assert!(
            names.iter().any(|n| home_of(n, 2) == home),
            "the channels should be homed on both shards"
        );
    }
    let epoch = epoch_of(addr, "rec-probe").await;

    // Subscribers first subscribe without `since` (every channel is at seq 0).
    let mut subs = Vec::new();
    for sub in 0..SUBSCRIBERS {
        let mut ws = connect_ws(addr).await;
        let mut last = vec![0u64; CHANNELS];
        let mut seen: Seen = vec![Vec::new(); CHANNELS];
        subscribe_all(&mut ws, sub, false, &epoch, &mut last, &mut seen).await;
        subs.push((ws, last, seen));
    }

    let publishing = Arc::new(AtomicBool::new(true));
    // Publisher 1: /ws, one round = one pipelined publish per channel, then the acks.
    let ws_publisher = tokio::spawn({
        let names = names.clone();
        async move {
            let mut ws = connect_ws(addr).await;
            let mut sent: HashMap<(usize, u64), Value> = HashMap::new();
            for r in 0..ROUNDS {
                for (c, name) in names.iter().enumerate() {
                    let text = json!({"type":"publish","channel":name,"data":{"src":"ws","r":r,"c":c},"id":c});
                    ws.feed(Message::text(text.to_string())).await.unwrap();
                }
                ws.flush().await.unwrap();
                for _ in 0..CHANNELS {
                    let v = recv_json(&mut ws).await;
                    assert_eq!(v["type"], "ack", "ws publisher: {v}");
                    let c = v["id"].as_u64().unwrap() as usize;
                    let seq = v["seq"].as_u64().unwrap();
                    assert!(
                        sent.insert((c, seq), json!({"src":"ws","r":r,"c":c}))
                            .is_none(),
                        "seq {seq} of channel {c} acked twice"
                    );
                }
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
            sent
        }
    });
    // Publisher 2: HTTP keep-alive, alternating single publishes and batches.
    let http_publisher = tokio::task::spawn_blocking({
        let names = names.clone();
        move || {
            let mut conn = HttpConn::connect(addr);
            let mut sent: HashMap<(usize, u64), Value> = HashMap::new();
            let mut record = |c: usize, seq: u64, data: Value| {
                assert!(
                    sent.insert((c, seq), data).is_none(),
                    "seq {seq} of channel {c} acked twice"
                );
            };
            for r in 0..ROUNDS {
                if r % 2 == 0 {
                    let messages: Vec<Value> = names
                        .iter()
                        .enumerate()
                        .map(|(c, n)| json!({"channel":n,"data":{"src":"http-batch","r":r,"c":c}}))
                        .collect();
                    let resp =
                        conn.publish(Some(API_KEY), &json!({ "messages": messages }).to_string());
                    assert_eq!(resp.status, 200, "batch publish: {}", resp.text());
                    let results = resp.json()["results"]
                        .as_array()
                        .cloned()
                        .expect("results list");
                    assert_eq!(results.len(), CHANNELS);
                    for (c, res) in results.iter().enumerate() {
                        let seq = res["seq"].as_u64().expect("seq");
                        record(c, seq, json!({"src":"http-batch","r":r,"c":c}));
                    }
                } else {
                    for (c, n) in names.iter().enumerate() {
                        let data = json!({"src":"http","r":r,"c":c});
                        let resp = conn
                            .publish(Some(API_KEY), &json!({"channel":n,"data":data}).to_string());
                        assert_eq!(resp.status, 200, "publish: {}", resp.text());
                        record(c, resp.json()["seq"].as_u64().expect("seq"), data);
                    }
                }
                std::thread::sleep(Duration::from_millis(8));
            }
            sent
        }
    });

    // Subscribers: read a while, drop the connection (close frame or plain TCP drop),
    // stay away while publishing goes on, reconnect and resume with since + epoch.
    let handles: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(sub, (ws, mut last, mut seen))| {
            let publishing = Arc::clone(&publishing);
            let epoch = epoch.clone();
            tokio::spawn(async move {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((sub as u64 + 1) * 0x1234_5678));
                let mut ws = ws;
                let mut cycles = 0;
                while publishing.load(Ordering::Acquire) {
                    let read_for = Duration::from_millis(50 + rng.next(200));
                    let until = tokio::time::Instant::now() + read_for;
                    while let Ok(Some(ev)) =
                        tokio::time::timeout_at(until, next_event(&mut ws, Duration::from_secs(5)))
                            .await
                    {
                        match ev {
                            Event::Text(t) => {
                                let v: Value = serde_json::from_str(&t).expect("JSON");
                                assert!(
                                    apply(&v, sub, &epoch, &mut last, &mut seen).is_none(),
                                    "unexpected {v}"
                                );
                            }
                            other => panic!("subscriber {sub}: {other:?}"),
                        }
                    }
                    if cycles % 2 == 0 {
                        let _ = ws.close(None).await;
                    }
                    drop(ws);
                    tokio::time::sleep(Duration::from_millis(20 + rng.next(150))).await;
                    ws = connect_ws(addr).await;
                    subscribe_all(&mut ws, sub, true, &epoch, &mut last, &mut seen).await;
                    cycles += 1;
                }
                (ws, last, seen, cycles)
            })
        })
        .collect();

    let ws_sent = ws_publisher.await.expect("ws publisher");
    let http_sent = http_publisher.await.expect("http publisher");
    publishing.store(false, Ordering::Release);
    let mut sent = ws_sent;
    for (k, v) in http_sent {
        assert!(
            sent.insert(k, v).is_none(),
            "seq {k:?} acked to both publishers"
        );
    }
    // Each round publishes one message per channel from each publisher.
    let final_seq = 2 * ROUNDS;
    for c in 0..CHANNELS {
        let mut seqs: Vec<u64> = sent
            .keys()
            .filter(|(ch, _)| *ch == c)
            .map(|(_, s)| *s)
            .collect();
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=final_seq).collect::<Vec<_>>(),
            "acked seqs of {} are 1..={final_seq}",
            channel_name(c)
        );
    }

    for (sub, h) in handles.into_iter().enumerate() {
        let (mut ws, mut last, mut seen, cycles) = h.await.expect("subscriber task");
        assert!(
            cycles >= 3,
            "subscriber {sub} reconnected only {cycles} times; the test needs more publishing time"
        );
        // Drain the live tail up to the final seq of every channel.
        let deadline = Instant::now() + Duration::from_secs(10);
        while last.iter().any(|&l| l < final_seq) {
            assert!(
                Instant::now() < deadline,
                "subscriber {sub} stuck at {last:?} (final {final_seq})"
            );
            let v = recv_json(&mut ws).await;
            assert!(
                apply(&v, sub, &epoch, &mut last, &mut seen).is_none(),
                "unexpected {v}"
            );
        }
        // Nothing beyond: the next frame after a ping is the pong.
        ping_pong(&mut ws).await;
        for (c, list) in seen.iter().enumerate() {
            assert_eq!(list.len() as u64, final_seq, "subscriber {sub} channel {c}");
            for (seq, data) in list {
                assert_eq!(
                    Some(data),
                    sent.get(&(c, *seq)),
                    "subscriber {sub}: {} seq {seq} carries another publish's data",
                    channel_name(c)
                );
            }
        }
        eprintln!("subscriber {sub}: {cycles} reconnects, all {final_seq} x {CHANNELS} in order");
    }
    server.assert_healthy();
    eprintln!("recovery under load took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// history_gap
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_older_than_the_history_is_a_history_gap_with_oldest_and_latest() {
    let mut server = Server::start(&["--threads", "2", "--history-size", "5"]);
    let addr = server.addr();
    let mut publ = connect_ws(addr).await;
    // Two channels with different homes, each with 12 messages: history holds 8..=12.
    let names: Vec<&str> = vec!["gap-a", "gap-b", "gap-c", "gap-d"];
    assert!((0..2).all(|h| names.iter().any(|n| home_of(n, 2) == h)));
    for name in &names {
        assert_eq!(publish_n(&mut publ, name, 12).await, 12);
    }
    for (i, name) in names.iter().enumerate() {
        let mut ws = connect_ws(addr).await;
        let epoch = epoch_of(addr, name).await;
        let id = 10 * i as u64;
        // Exactly at the edge: since 7 needs 8.., which history still has.
        let (seqs, sub) = expect_replay(&mut ws, name, 7, Some(&epoch), id).await;
        assert_eq!(seqs, [8, 9, 10, 11, 12]);
        assert_eq!(sub["seq"], 12);
        // One further back is a gap: latest 12, oldest 8.
        let mut ws2 = connect_ws(addr).await;
        let gap = expect_gap(&mut ws2, name, 6, Some(&epoch), id + 1).await;
        assert_eq!(
            gap["seq"], 12,
            "history_gap.seq is the channel's latest: {gap}"
        );
        assert_eq!(
            gap["oldest"], 8,
            "history_gap.oldest is the oldest kept: {gap}"
        );
        let gap = expect_gap(&mut ws2, name, 0, None, id + 2).await;
        assert_eq!(
            (gap["seq"].as_u64(), gap["oldest"].as_u64()),
            (Some(12), Some(8)),
            "{gap}"
        );
        // A since ahead of the channel cannot be trusted either.
        let gap = expect_gap(&mut ws2, name, 13, Some(&epoch), id + 3).await;
        assert_eq!(gap["seq"], 12, "{gap}");
        // since == latest: nothing to replay.
        let (seqs, _) = expect_replay(&mut ws2, name, 12, Some(&epoch), id + 4).await;
        assert!(seqs.is_empty());
        // The gapped attempts left no subscription behind: exactly one live copy arrives.
        let seq = publish_raw(&mut publ, name, r#""live""#, 99).await;
        assert_eq!(seq, 13);
        for w in [&mut ws, &mut ws2] {
            let (got, data, _) = recv_message(w, name).await;
            assert_eq!((got, data), (13, json!("live")));
            ping_pong(w).await;
        }
    }
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_gap_the_client_can_subscribe_without_since_and_gets_live_messages() {
    let mut server = Server::start(&["--threads", "2", "--history-size", "2"]);
    let addr = server.addr();
    let mut publ = connect_ws(addr).await;
    publish_n(&mut publ, "gap-then-live", 5).await;
    let mut ws = connect_ws(addr).await;
    let gap = expect_gap(&mut ws, "gap-then-live", 1, None, 1).await;
    assert_eq!(
        (gap["seq"].as_u64(), gap["oldest"].as_u64()),
        (Some(5), Some(4)),
        "{gap}"
    );
    // Not "already_subscribed": the gap left nothing behind.
    let v = subscribe(&mut ws, "gap-then-live", 2).await;
    assert_eq!(v["seq"], 5);
    assert_eq!(publish_raw(&mut publ, "gap-then-live", "6", 3).await, 6);
    let (seq, data, _) = recv_message(&mut ws, "gap-then-live").await;
    assert_eq!((seq, data), (6, json!(6)));
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_older_than_the_ttl_is_a_gap() {
    // Long enough for publish, subscribe and replay on a busy machine; the wait for the
    // expiry is counted from the last ack, when all three are in the history.
    const TTL: Duration = Duration::from_secs(3);
    let ttl_ms = TTL.as_millis().to_string();
    let mut server = Server::start(&["--threads", "2", "--history-ttl-ms", &ttl_ms]);
    let addr = server.addr();
    let mut publ = connect_ws(addr).await;
    publish_n(&mut publ, "ttl", 3).await;
    let published = tokio::time::Instant::now();
    let mut ws = connect_ws(addr).await;
    let (seqs, _) = expect_replay(&mut ws, "ttl", 0, None, 1).await;
    assert_eq!(seqs, [1, 2, 3], "fresh history replays");
    tokio::time::sleep_until(published + TTL + Duration::from_millis(100)).await;
    let mut ws = connect_ws(addr).await;
    let gap = expect_gap(&mut ws, "ttl", 0, None, 2).await;
    assert_eq!(gap["seq"], 3, "{gap}");
    assert_eq!(
        gap["oldest"], 4,
        "everything expired: oldest is latest + 1: {gap}"
    );
    // since == latest still works (nothing was missed).
    let (seqs, _) = expect_replay(&mut ws, "ttl", 3, None, 3).await;
    assert!(seqs.is_empty());
    server.assert_healthy();
}

// ---------------------------------------------------------------------------------------
// Epochs
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_with_another_epoch_is_a_gap_and_every_shard_reports_one_epoch() {
    let mut server = Server::start(&["--threads", "2"]);
    let addr = server.addr();
    let mut publ = connect_ws(addr).await;
    publish_n(&mut publ, "ep", 4).await;
    // Many connections (both shards in practice) and channels (both homes) see one epoch.
    let mut epochs = std::collections::HashSet::new();
    for i in 0..16 {
        epochs.insert(epoch_of(addr, &format!("ep-{i}")).await);
    }
    assert_eq!(epochs.len(), 1, "one process, one epoch: {epochs:?}");
    let epoch = epochs.into_iter().next().unwrap();

    let mut ws = connect_ws(addr).await;
    let gap = expect_gap(&mut ws, "ep", 2, Some("not-this-epoch"), 1).await;
    assert_eq!(
        (gap["seq"].as_u64(), gap["oldest"].as_u64()),
        (Some(4), Some(1)),
        "{gap}"
    );
    let gap = expect_gap(&mut ws, "ep", 4, Some(""), 2).await;
    assert_eq!(gap["seq"], 4, "{gap}");
    let (seqs, sub) = expect_replay(&mut ws, "ep", 2, Some(&epoch), 3).await;
    assert_eq!(seqs, [3, 4]);
    assert_eq!(sub["epoch"], epoch.as_str());
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_begins_a_new_epoch_and_an_old_since_gets_a_gap() {
    let first = Server::start(&["--threads", "2"]);
    let mut publ = connect_ws(first.addr()).await;
    publish_n(&mut publ, "restart", 5).await;
    let old_epoch = epoch_of(first.addr(), "restart").await;
    drop(publ);
    drop(first); // SIGKILL

    let mut second = Server::start(&["--threads", "2"]);
    let addr = second.addr();
    let mut publ = connect_ws(addr).await;
    // The same seq numbers exist again, with other data: only the epoch tells them apart.
    publish_n(&mut publ, "restart", 5).await;
    let new_epoch = epoch_of(addr, "restart").await;
    assert_ne!(old_epoch, new_epoch, "a restart must begin a new epoch");

    let mut ws = connect_ws(addr).await;
    let gap = expect_gap(&mut ws, "restart", 2, Some(&old_epoch), 1).await;
    assert_eq!(
        (gap["seq"].as_u64(), gap["oldest"].as_u64()),
        (Some(5), Some(1)),
        "{gap}"
    );
    // A since past the new run's latest is a gap whatever the epoch.
    let gap = expect_gap(&mut ws, "fresh-after-restart", 3, Some(&old_epoch), 2).await;
    assert_eq!(gap["seq"], 0, "{gap}");
    // The long-poll says the same about the old epoch.
    let resp = tokio::task::spawn_blocking(move || {
        let mut conn = HttpConn::connect(addr);
        let target = format!(
            "/poll?channel=restart&since=2&timeout=5&epoch={}",
            support_http::query_escape(&old_epoch)
        );
        conn.get(&target, Duration::from_secs(5))
    })
    .await
    .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    let v = resp.json();
    assert_eq!(v["history_gap"]["oldest"], 1, "poll with an old epoch: {v}");
    assert_eq!(v["messages"], json!([]), "{v}");
    assert_eq!(v["epoch"], new_epoch.as_str(), "{v}");
    // With the new epoch the replay works.
    let (seqs, _) = expect_replay(&mut ws, "restart", 2, Some(&new_epoch), 3).await;
    assert_eq!(seqs, [3, 4, 5]);
    second.assert_healthy();
}
