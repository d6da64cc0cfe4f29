//! The pub/sub JSON protocol on `/ws` (DESIGN.md "Pub/sub protocol"), against the real
//! binary with two shards.

use crate::support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use futures_util::stream::{self, StreamExt};
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_gets_pong() {
    let mut server = Server::start(&[]);
    let mut ws = connect_ws(server.addr()).await;
    ping_pong(&mut ws).await;
    ping_pong(&mut ws).await;
    server.assert_healthy();
}

/// DESIGN.md's heartbeat: a WebSocket that does not answer a ping within the pong
/// timeout is closed with 1001, well before the idle timeout; a client that answers
/// (tungstenite answers pings as it reads) stays open across many intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_not_answering_pings_is_closed_at_the_pong_timeout_and_one_answering_stays() {
    let (interval, pong_timeout) = (Duration::from_millis(300), Duration::from_millis(500));
    let mut server = Server::start(&[
        "--ping-interval-ms",
        "300",
        "--pong-timeout-ms",
        "500",
        "--idle-timeout-ms",
        "60000",
    ]);
    let addr = server.addr();
    let silent = blocking(move || {
        let (mut s, mut buf) = raw_ws(addr);
        let started = Instant::now();
        let mut last_ping = None;
        loop {
            let frame = read_frame(&mut s, &mut buf, Duration::from_secs(10))
                .expect("closed without a close frame");
            match frame.opcode {
                0x9 => last_ping = Some(Instant::now()),
                0x8 => {
                    let reason = String::from_utf8_lossy(&frame.payload[2..]).into_owned();
                    return (frame.close_code(), reason, started, last_ping);
                }
                other => panic!("unexpected frame {other:#x}"),
            }
        }
    });
    // Reading all along, so its pongs go out as the pings come.
    let mut answering = connect_ws(addr).await;
    subscribe(&mut answering, "heartbeat", 1).await;
    let answering = tokio::spawn(async move {
        expect_silence(&mut answering, interval * 12).await;
        answering
    });
    let (code, reason, started, last_ping) = silent.await;
    let closed = Instant::now();
    assert_eq!(code, Some(1001), "{reason}");
    assert!(reason.contains("pong"), "{reason}");
    assert!(last_ping.is_some(), "pinged before being closed");
    // Not before the pong timeout ran out after a ping, which came after the upgrade
    // (`started`: a client slow to read a ping records it late, so its own time of
    // reading bounds nothing); within 1.5 intervals and the pong timeout of connecting
    // (slack for a busy machine), never at the idle timeout.
    assert!(closed - started >= pong_timeout, "{:?}", closed - started);
    assert!(closed - started < interval * 3 / 2 + pong_timeout + Duration::from_secs(3));
    // The answering client saw no close in all that time, nor in several more intervals.
    let mut answering = answering.await.unwrap();
    ping_pong(&mut answering).await;
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_on_fresh_channel_reports_seq_zero_and_echoes_id() {
    let mut server = Server::start(&[]);
    let mut ws = connect_ws(server.addr()).await;
    let v = subscribe(&mut ws, "fresh", 41).await;
    assert_eq!(v["seq"], 0, "fresh channel must report seq 0: {v}");
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_channel_without_subscribers_is_acked_with_increasing_seq() {
    let mut server = Server::start(&[]);
    let mut ws = connect_ws(server.addr()).await;
    assert_eq!(publish_raw(&mut ws, "nobody-listens", "1", 1).await, 1);
    assert_eq!(
        publish_raw(&mut ws, "nobody-listens", r#""two""#, 2).await,
        2
    );
    assert_eq!(publish_raw(&mut ws, "nobody-listens", "null", 3).await, 3);
    // Another channel has its own sequence.
    assert_eq!(publish_raw(&mut ws, "other", "{}", 4).await, 1);
    // A late subscriber learns the latest seq.
    let mut late = connect_ws(server.addr()).await;
    let v = subscribe(&mut late, "nobody-listens", 5).await;
    assert_eq!(
        v["seq"], 3,
        "subscribed.seq must be the channel's latest seq: {v}"
    );
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_receives_publish_from_another_connection() {
    let mut server = Server::start(&[]);
    let mut sub = connect_ws(server.addr()).await;
    let mut publ = connect_ws(server.addr()).await;
    subscribe(&mut sub, "news", 1).await;
    let seq = publish_raw(&mut publ, "news", r#"{"headline":"hi"}"#, 7).await;
    assert_eq!(seq, 1);
    let (got_seq, data, _) = recv_message(&mut sub, "news").await;
    assert_eq!(got_seq, seq);
    assert_eq!(data, json!({"headline":"hi"}));
    // The publisher is not subscribed: it gets nothing but its ack.
    expect_silence(&mut publ, Duration::from_millis(200)).await;
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_and_subscribers_on_both_shards_see_every_message_in_seq_order() {
    // 16 + 16 connections over 2 SO_REUSEPORT shards: all landing on one shard has
    // probability 2^-31, so this crosses shards in practice.
    const SUBS: usize = 16;
    const PUBS: usize = 16;
    const EACH: usize = 5;
    let mut server = Server::start(&["--threads", "2"]);
    let addr = server.addr();

    let mut subs = Vec::new();
    for i in 0..SUBS {
        let mut ws = connect_ws(addr).await;
        subscribe(&mut ws, "x-shard", i as u64).await;
        subs.push(ws);
    }
    let mut pubs = Vec::new();
    for _ in 0..PUBS {
        pubs.push(connect_ws(addr).await);
    }

    // All publishers run at once; each publishes its messages one after another.
    let publishers = pubs.into_iter().enumerate().map(|(p, mut ws)| {
        tokio::spawn(async move {
            let mut seqs = Vec::new();
            for k in 0..EACH {
                let data = format!(r#"{{"p":{p},"k":{k}}}"#);
                seqs.push(publish_raw(&mut ws, "x-shard", &data, k as u64).await);
            }
            // One connection's sequential publishes get increasing seqs.
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "publisher {p} acks out of order: {seqs:?}"
            );
            (ws, seqs)
        })
    });
    let mut all_seqs = Vec::new();
    let mut keep = Vec::new();
    for h in publishers.collect::<Vec<_>>() {
        let (ws, seqs) = h.await.expect("publisher task");
        all_seqs.extend(seqs);
        keep.push(ws);
    }
    all_seqs.sort_unstable();
    let total = (PUBS * EACH) as u64;
    assert_eq!(
        all_seqs,
        (1..=total).collect::<Vec<_>>(),
        "acked seqs must be exactly 1..={total}"
    );

    let receivers = subs.into_iter().enumerate().map(|(i, mut ws)| {
        tokio::spawn(async move {
            let mut seen = HashSet::new();
            let mut last_k = vec![None::<u64>; PUBS];
            for expect in 1..=total {
                let (seq, data, raw) = recv_message(&mut ws, "x-shard").await;
                assert_eq!(seq, expect, "subscriber {i}: seq gap or reorder at {raw}");
                let p = data["p"].as_u64().unwrap() as usize;
                let k = data["k"].as_u64().unwrap();
                assert!(seen.insert((p, k)), "subscriber {i}: duplicate {raw}");
                if let Some(prev) = last_k[p] {
                    assert!(
                        k > prev,
                        "subscriber {i}: publisher {p}'s messages out of order"
                    );
                }
                last_k[p] = Some(k);
            }
            ping_pong(&mut ws).await; // nothing extra queued before the pong
            expect_silence(&mut ws, Duration::from_millis(200)).await;
        })
    });
    for h in receivers.collect::<Vec<_>>() {
        h.await.expect("subscriber task");
    }
    drop(keep);
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_subscribers_each_receive_every_message_once_in_seq_order() {
    const SUBS: usize = 1000;
    const MSGS: u64 = 100;
    let started = Instant::now();
    let mut server = Server::start(&["--threads", "2"]);
    let addr = server.addr();

    // Connect and subscribe with bounded concurrency.
    let subs: Vec<Ws> = stream::iter(0..SUBS)
        .map(|i| async move {
            let mut ws = connect_ws(addr).await;
            let v = subscribe(&mut ws, "fanout", i as u64).await;
            assert_eq!(v["seq"], 0);
            ws
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert_eq!(subs.len(), SUBS);
    eprintln!("{SUBS} subscribers ready after {:?}", started.elapsed());

    // Pipeline all publishes, then collect the acks.
    let mut publ = connect_ws(addr).await;
    for i in 0..MSGS {
        let text =
            format!(r#"{{"type":"publish","channel":"fanout","data":{{"i":{i}}},"id":{i}}}"#);
        publ.feed(Message::text(text)).await.unwrap();
    }
    publ.flush().await.unwrap();
    for i in 0..MSGS {
        let v = recv_json(&mut publ).await;
        assert_eq!(v["type"], "ack", "expected ack, got {v}");
        assert_eq!(v["id"], i, "acks out of order: {v}");
        assert_eq!(
            v["seq"],
            i + 1,
            "first publishes to a fresh channel get seq 1.. : {v}"
        );
    }

    let handles: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(n, mut ws)| {
            tokio::spawn(async move {
                for i in 0..MSGS {
                    let (seq, data, raw) = recv_message(&mut ws, "fanout").await;
                    assert_eq!(
                        seq,
                        i + 1,
                        "subscriber {n}: expected seq {}, got {raw}",
                        i + 1
                    );
                    assert_eq!(data, json!({"i": i}), "subscriber {n}: wrong data in {raw}");
                }
                ping_pong(&mut ws).await;
                ws
            })
        })
        .collect();
    let mut done = Vec::with_capacity(SUBS);
    for h in handles {
        done.push(h.await.expect("subscriber task"));
    }
    // No duplicates trail in after the pong barrier.
    let quiet: Vec<_> = done
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move { expect_silence(&mut ws, Duration::from_millis(300)).await })
        })
        .collect();
    for h in quiet {
        h.await.expect("silence check");
    }
    // How long it took is for the benchmarks; every receive above was bounded.
    eprintln!("fan-out test took {:?}", started.elapsed());
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_is_delivered_byte_for_byte() {
    let mut server = Server::start(&[]);
    let mut sub = connect_ws(server.addr()).await;
    let mut publ = connect_ws(server.addr()).await;
    subscribe(&mut sub, "raw", 1).await;
    let cases = [
        r#"{"b": [1, 2.50, "\u00e9\n"] , "a":null}"#,
        r#""\"quoted\" \\ \/ é€😀 \ud83d\ude00""#,
        r#"[1e3,-0.0,  1E-7 ,true,false,null,{}]"#,
    ];
    for (i, data) in cases.iter().enumerate() {
        let seq = publish_raw(&mut publ, "raw", data, i as u64).await;
        let (got_seq, parsed, raw) = recv_message(&mut sub, "raw").await;
        assert_eq!(got_seq, seq);
        assert!(
            raw.contains(data),
            "data not byte for byte:\n sent {data}\n got  {raw}"
        );
        let want: Value = serde_json::from_str(data).unwrap();
        assert_eq!(parsed, want);
    }
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_beyond_64_bits_in_data_are_passed_through() {
    // Any JSON is valid `data`; the server must not reject or round big numbers.
    let mut server = Server::start(&[]);
    let mut sub = connect_ws(server.addr()).await;
    let mut publ = connect_ws(server.addr()).await;
    subscribe(&mut sub, "big", 1).await;
    let data = r#"[123456789012345678901234567890,-98765432109876543210,1.000000000000000000001]"#;
    publish_raw(&mut publ, "big", data, 1).await;
    let (_, _, raw) = recv_message(&mut sub, "big").await;
    assert!(
        raw.contains(data),
        "data not byte for byte:\n sent {data}\n got  {raw}"
    );
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_gets_bad_request_and_connection_stays_usable() {
    let mut server = Server::start(&[]);
    let mut ws = connect_ws(server.addr()).await;
    for bad in [
        r#"{"type":"#,
        "not json",
        r#"{"type":"publish","channel":"c","data":}"#,
        "",
    ] {
        send_text(&mut ws, bad).await;
        let v = recv_json(&mut ws).await;
        assert_eq!(v["type"], "error", "{bad:?} should get an error, got {v}");
        assert_eq!(v["code"], "bad_request", "{bad:?}: {v}");
        assert!(v["message"].is_string(), "error without message: {v}");
    }
    ping_pong(&mut ws).await;
    subscribe(&mut ws, "still-works", 3).await;
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type_gets_unknown_type_error_with_id_and_connection_stays_usable() {
    let mut server = Server::start(&[]);
    let mut ws = connect_ws(server.addr()).await;
    send_text(&mut ws, r#"{"type":"frobnicate","id":9}"#).await;
    let v = recv_json(&mut ws).await;
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["code"], "unknown_type", "{v}");
    assert_eq!(v["id"], 9, "error should echo the request id: {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without message: {v}"
    );
    ping_pong(&mut ws).await;
    assert_eq!(publish_raw(&mut ws, "after-error", "true", 10).await, 1);
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    let mut server = Server::start(&[]);
    let mut leaver = connect_ws(server.addr()).await;
    let mut stayer = connect_ws(server.addr()).await;
    let mut publ = connect_ws(server.addr()).await;
    subscribe(&mut leaver, "u", 1).await;
    subscribe(&mut stayer, "u", 1).await;

    publish_raw(&mut publ, "u", "1", 1).await;
    assert_eq!(recv_message(&mut leaver, "u").await.0, 1);
    assert_eq!(recv_message(&mut stayer, "u").await.0, 1);

    send_text(
        &mut leaver,
        r#"{"type":"unsubscribe","channel":"u","id":2}"#,
    )
    .await;
    let v = recv_json(&mut leaver).await;
    assert_eq!(v["type"], "unsubscribed", "{v}");
    assert_eq!(v["channel"], "u", "{v}");
    assert_eq!(v["id"], 2, "{v}");

    publish_raw(&mut publ, "u", "2", 2).await;
    // The one still subscribed gets it, so the publish went through the hub...
    assert_eq!(recv_message(&mut stayer, "u").await.0, 2);
    // ...and the one that left gets nothing.
    ping_pong(&mut leaver).await;
    expect_silence(&mut leaver, Duration::from_millis(300)).await;
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frame_on_ws_closes_with_1003() {
    let mut server = Server::start(&[]);
    let mut ws = connect_ws(server.addr()).await;
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(recv_close_code(&mut ws, RECV_TIMEOUT).await, 1003);
    // The server itself is fine.
    let mut other = connect_ws(server.addr()).await;
    ping_pong(&mut other).await;
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_over_max_message_bytes_closes_with_1009() {
    let mut server = Server::start(&["--max-message-bytes", "1024"]);
    let mut ws = connect_ws(server.addr()).await;
    // Just under the limit is fine.
    let ok = format!(
        r#"{{"type":"publish","channel":"c","data":"{}","id":1}}"#,
        "a".repeat(900)
    );
    assert!(ok.len() <= 1024);
    send_text(&mut ws, &ok).await;
    assert_eq!(recv_json(&mut ws).await["type"], "ack");
    let big = format!(
        r#"{{"type":"publish","channel":"c","data":"{}","id":2}}"#,
        "a".repeat(2000)
    );
    send_text(&mut ws, &big).await;
    assert_eq!(recv_close_code(&mut ws, RECV_TIMEOUT).await, 1009);
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_endpoint_echoes_text_and_binary() {
    // The binary message is past /echo's default 64 KiB: raised, as a conformance run does.
    let mut server = Server::start(&["--echo-max-message-bytes", "131072"]);
    let mut ws = connect(server.addr(), "/echo").await;
    send_text(&mut ws, "héllo, echo").await;
    assert_eq!(recv_text(&mut ws).await, "héllo, echo");
    let blob = pseudo_random_bytes(7, 100_000);
    ws.send(Message::binary(blob.clone())).await.unwrap();
    match next_event(&mut ws, RECV_TIMEOUT).await {
        Some(Event::Binary(b)) => assert!(b == blob, "binary echo differs"),
        other => panic!("expected binary echo, got {other:?}"),
    }
    server.assert_healthy();
}
