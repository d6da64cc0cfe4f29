//! Slow consumers and shedding, drain, request and idle timeouts, a full cluster queue.

use super::*;

#[test]
fn slow_consumer_is_closed_with_4008_after_what_it_was_sent() {
    let config = Config {
        outbound_queue_bytes: 4096,
        ..Config::default()
    };
    let mut cluster = Cluster::new(1, config);
    let slow = cluster.connect(0, "/ws");
    cluster.send(slow, r#"{"type":"subscribe","channel":"c"}"#);
    cluster.settle();
    cluster.take_output(slow);
    let p = cluster.connect(0, "/ws");
    let data = "x".repeat(100);
    for _ in 0..100 {
        cluster.send(
            p,
            &format!(r#"{{"type":"publish","channel":"c","data":"{data}"}}"#),
        );
    }
    cluster.settle();
    let frames = cluster.frames(slow);
    let (last_op, last) = frames.last().unwrap();
    assert_eq!(*last_op, OpCode::Close);
    assert_eq!(u16::from_be_bytes([last[0], last[1]]), 4008);
    assert!(frames.len() < 100);
    assert_eq!(cluster.shards[0].counters().slow_consumer_closes_total, 1);
}

/// A subscriber that reads nothing while 100 messages of 100 bytes arrive on a 4 KiB
/// budget, under `policy`: returns the texts it would then read.
fn slow_subscriber_under(policy: SlowConsumerPolicy) -> Vec<String> {
    let config = Config {
        outbound_queue_bytes: 4096,
        slow_consumers: crate::limits::SlowConsumerPolicies {
            default: SlowConsumerPolicy::Disconnect,
            by_prefix: vec![crate::limits::SlowConsumerPrefix {
                prefix: "feed.".into(),
                policy,
            }],
        },
        ..Config::default()
    };
    let mut cluster = Cluster::new(1, config);
    let slow = cluster.connect(0, "/ws");
    cluster.send(slow, r#"{"type":"subscribe","channel":"feed.a"}"#);
    cluster.settle();
    cluster.take_output(slow);
    let p = cluster.connect(0, "/ws");
    let data = "x".repeat(100);
    for _ in 0..100 {
        cluster.send(
            p,
            &format!(r#"{{"type":"publish","channel":"feed.a","data":"{data}"}}"#),
        );
    }
    cluster.settle();
    assert_eq!(cluster.shards[0].counters().slow_consumer_closes_total, 0);
    cluster.texts(slow)
}

/// Every sequence number 1..=100 is delivered or inside a gap notice, in order;
/// returns how many gap notices there were.
fn assert_nothing_lost_silently(texts: &[String]) -> usize {
    let number = |text: &str, key: &str| -> u64 {
        let rest = &text[text.find(key).unwrap() + key.len()..];
        rest.split([',', '}']).next().unwrap().parse().unwrap()
    };
    let mut next = 1;
    let mut gaps = 0;
    for text in texts {
        if text.starts_with(r#"{"type":"gap","channel":"feed.a""#) {
            assert_eq!(number(text, "\"from\":"), next, "{texts:?}");
            next = number(text, "\"to\":") + 1;
            gaps += 1;
        } else {
            assert_eq!(seq_of(text), next, "{texts:?}");
            next += 1;
        }
    }
    assert_eq!(next, 101, "{texts:?}");
    gaps
}

#[test]
fn drop_oldest_sheds_with_gap_notices_and_loses_nothing_silently() {
    let texts = slow_subscriber_under(SlowConsumerPolicy::DropOldest);
    assert!(assert_nothing_lost_silently(&texts) >= 1);
}

#[test]
fn conflate_keeps_the_newest_message_with_a_gap_notice() {
    let texts = slow_subscriber_under(SlowConsumerPolicy::Conflate);
    // Conflation squeezed the queue to one message at a time: one widened notice.
    assert_eq!(assert_nothing_lost_silently(&texts), 1);
    assert_eq!(seq_of(texts.last().unwrap()), 100);
}

#[test]
fn drain_closes_every_websocket_with_1001_and_refuses_new_ones() {
    let mut cluster = Cluster::new(1, Config::default());
    let a = cluster.connect(0, "/ws");
    let b = cluster.connect(0, "/echo");
    cluster.shards[0].begin_drain(cluster.now);
    for c in [a, b] {
        let frames = cluster.frames(c);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].0, OpCode::Close);
        assert_eq!(&frames[0].1[..2], &1001u16.to_be_bytes());
    }
    assert_eq!(cluster.shards[0].accept(cluster.now, LOCALHOST), None);
    // The client answers the close: the connection finishes.
    let reply = encode_client_frame(OpCode::Close, true, &1001u16.to_be_bytes(), [9; 4]);
    cluster.write(a, &reply);
    cluster.take_output(a);
    assert!(cluster.shards[0].poll_flushed(a.key));
}

#[test]
fn incomplete_handshake_times_out_with_408() {
    let mut cluster = Cluster::new(1, Config::default());
    let key = cluster.shards[0].accept(cluster.now, LOCALHOST).unwrap();
    let c = Client { shard: 0, key };
    cluster.write(c, b"GET /ws HTTP/1.1\r\nHost:");
    let later = cluster.now + Duration::from_secs(11);
    cluster.shards[0].handle_timeout(later);
    let out = cluster.take_output(c);
    assert!(out.starts_with(b"HTTP/1.1 408 "), "{out:?}");
    assert!(cluster.shards[0].poll_flushed(key));
}

#[test]
fn idle_connection_is_pinged_then_closed() {
    let mut cluster = Cluster::new(1, Config::default());
    let c = cluster.connect(0, "/ws");
    let ping_at = cluster.now + Duration::from_secs(25);
    cluster.shards[0].handle_timeout(ping_at);
    assert_eq!(cluster.frames(c), [(OpCode::Ping, vec![])]);
    let close_at = ping_at + Duration::from_secs(50);
    cluster.shards[0].handle_timeout(close_at);
    let frames = cluster.frames(c);
    assert_eq!(frames[0].0, OpCode::Close);
    assert_eq!(&frames[0].1[..2], &1001u16.to_be_bytes());
}

#[test]
fn a_full_cluster_queue_refuses_at_once_and_never_blocks_the_shard() {
    let mut ctx = Context::new(Config::default(), 1, SystemTime::now()).unwrap();
    // The cluster thread never runs: whatever is queued stays queued.
    let (bridge, _idle) = Bridge::new(
        "redis://127.0.0.1:1",
        ctx.config.namespaces.history_policy(),
        ctx.config.redis_ack_replicas,
        ctx.config.redis_buffer_bytes,
        ctx.config.compression.clone(),
    )
    .unwrap();
    let conn = ConnRef {
        key: u32::MAX,
        generation: 0,
    };
    let filler = |channel: &str| cluster::Request::Subscribe {
        channel: channel.into(),
        shard: 0,
        conn,
        ticket: 0,
        since: None,
        epoch: None,
        id: None,
        max_replay_bytes: 0,
    };
    let mut i = 0;
    while bridge.send(filler(&format!("f{i}"))).is_ok() {
        i += 1;
    }
    let publish = || cluster::Request::Publish {
        channel: "p".into(),
        data: Bytes::new(),
        expect_seq: None,
        shard: 0,
        conn,
        id: None,
    };
    while bridge.send(publish()).is_ok() {}
    ctx.cluster = Some(bridge);
    let mut cluster = Cluster::with_context(1, ctx);
    let client = cluster.connect(0, "/ws");
    cluster.send(client, r#"{"type":"subscribe","channel":"news","id":1}"#);
    cluster.send(
        client,
        r#"{"type":"publish","channel":"news","data":1,"id":2}"#,
    );
    cluster.settle();
    let texts = cluster.texts(client);
    assert_eq!(texts.len(), 2, "{texts:?}");
    for (text, id) in texts.iter().zip([1, 2]) {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str(), v["id"].as_u64()),
            (Some("error"), Some("unavailable"), Some(id)),
            "{text}"
        );
    }
    // The refused subscription holds no slot: all of them are free for retries, and
    // the shard keeps reading the connection.
    let shard = &cluster.shards[0];
    assert!(shard.conns[client.key].subs.is_empty());
    let Phase::WebSocket(socket) = &shard.conns[client.key].phase else {
        panic!("still a WebSocket");
    };
    assert_eq!(socket.inflight_publishes, 0);
    assert!(cluster.shards[0].wants_read(client.key));

    let key = cluster.shards[0].accept(cluster.now, LOCALHOST).unwrap();
    let poller = Client { shard: 0, key };
    cluster.write(
        poller,
        b"GET /poll?channel=news HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let response = String::from_utf8(cluster.take_output(poller)).unwrap();
    assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
    assert!(response.contains("\r\nRetry-After: 1\r\n"), "{response}");
    assert!(response.contains(r#""code":"unavailable""#), "{response}");
}
