//! Publish, subscribe and unsubscribe across shards; shared frames.

use super::*;

#[test]
fn publish_reaches_subscribers_on_every_shard_in_order_once() {
    let mut cluster = Cluster::new(3, Config::default());
    let channel = homed_on(2, 3);
    let subscribers: Vec<Client> = (0..6).map(|i| cluster.connect(i % 3, "/ws")).collect();
    for &s in &subscribers {
        cluster.send(
            s,
            &format!(r#"{{"type":"subscribe","channel":"{channel}","id":1}}"#),
        );
    }
    cluster.settle();
    for &s in &subscribers {
        let texts = cluster.texts(s);
        assert_eq!(
            texts,
            [format!(
                r#"{{"type":"subscribed","channel":"{channel}","seq":0,"epoch":"e1","id":1}}"#
            )]
        );
    }
    let publisher = cluster.connect(0, "/ws");
    for n in 0..5 {
        let json =
            format!(r#"{{"type":"publish","channel":"{channel}","data":[{n}, "x"],"id":{n}}}"#);
        cluster.send(publisher, &json);
    }
    cluster.settle();
    let acks = cluster.texts(publisher);
    let expected: Vec<String> = (0..5)
        .map(|n| format!(r#"{{"type":"ack","id":{n},"seq":{}}}"#, n + 1))
        .collect();
    assert_eq!(acks, expected);
    for &s in &subscribers {
        let expected: Vec<String> = (0..5)
            .map(|n| {
                format!(
                    r#"{{"type":"message","channel":"{channel}","seq":{},"data":[{n}, "x"]}}"#,
                    n + 1
                )
            })
            .collect();
        assert_eq!(cluster.texts(s), expected);
    }
}

#[test]
fn every_subscriber_shares_one_frame_allocation() {
    let mut cluster = Cluster::new(2, Config::default());
    let a = cluster.connect(0, "/ws");
    let b = cluster.connect(1, "/ws");
    for c in [a, b] {
        cluster.send(c, r#"{"type":"subscribe","channel":"news"}"#);
    }
    cluster.settle();
    cluster.take_output(a);
    cluster.take_output(b);
    cluster.send(a, r#"{"type":"publish","channel":"news","data":1}"#);
    cluster.settle();
    let front = |cluster: &mut Cluster, c: Client| {
        let outbox = cluster.shards[c.shard].outbox(c.key);
        let mut slices = [std::io::IoSlice::new(&[]); 1];
        outbox.io_slices(&mut slices);
        slices[0].as_ptr()
    };
    assert_eq!(front(&mut cluster, a), front(&mut cluster, b));
}

#[test]
fn compressing_subscribers_share_one_deflated_frame_allocation() {
    let config = Config {
        compression: crate::compression::CompressionPolicies {
            default: CompressionPolicy::Shared,
            by_prefix: Vec::new(),
        },
        ..Config::default()
    };
    let mut cluster = Cluster::new(2, config);
    let deflating = |cluster: &mut Cluster, shard: usize| {
        let handshake = ClientHandshake::new("/ws", "x", NONCE).extensions("permessage-deflate");
        let (client, extensions) = cluster.upgrade(shard, &handshake);
        assert_eq!(extensions.as_deref(), Some("permessage-deflate"));
        client
    };
    let a = deflating(&mut cluster, 0);
    let b = deflating(&mut cluster, 1);
    let plain = cluster.connect(1, "/ws");
    for c in [a, b, plain] {
        cluster.send(c, r#"{"type":"subscribe","channel":"news"}"#);
    }
    cluster.settle();
    for c in [a, b, plain] {
        cluster.take_output(c);
    }
    let data = format!("[{}]", vec!["\"compressible\""; 50].join(","));
    cluster.send(
        a,
        &format!(r#"{{"type":"publish","channel":"news","data":{data}}}"#),
    );
    cluster.settle();
    let front = |cluster: &mut Cluster, c: Client| {
        let outbox = cluster.shards[c.shard].outbox(c.key);
        let mut slices = [std::io::IoSlice::new(&[]); 1];
        outbox.io_slices(&mut slices);
        (slices[0].as_ptr(), slices[0][0], slices[0].len())
    };
    let (shared, first_byte, len) = front(&mut cluster, a);
    assert_eq!(first_byte, 0xC1, "FIN, RSV1, text");
    assert_eq!(front(&mut cluster, b).0, shared);
    let (plain_ptr, plain_first, plain_len) = front(&mut cluster, plain);
    assert_ne!(plain_ptr, shared);
    assert_eq!(plain_first, 0x81);
    assert!(len * 4 < plain_len, "{len} vs {plain_len}");
}

#[test]
fn unsubscribe_while_pending_is_carried_out_after_confirmation() {
    let mut cluster = Cluster::new(2, Config::default());
    let channel = homed_on(1, 2);
    let c = cluster.connect(0, "/ws");
    cluster.send(
        c,
        &format!(r#"{{"type":"subscribe","channel":"{channel}","id":1}}"#),
    );
    cluster.send(
        c,
        &format!(r#"{{"type":"unsubscribe","channel":"{channel}","id":2}}"#),
    );
    cluster.settle();
    let texts = cluster.texts(c);
    assert!(texts[0].starts_with(r#"{"type":"subscribed""#), "{texts:?}");
    assert_eq!(
        texts[1],
        format!(r#"{{"type":"unsubscribed","channel":"{channel}","id":2}}"#)
    );
    assert_eq!(cluster.home_counts(&channel), [0, 0]);
}

#[test]
fn a_closed_connection_releases_its_subscriptions() {
    let mut cluster = Cluster::new(2, Config::default());
    let channel = homed_on(0, 2);
    let c = cluster.connect(1, "/ws");
    cluster.send(
        c,
        &format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#),
    );
    cluster.settle();
    assert_eq!(cluster.home_counts(&channel), [0, 1]);
    cluster.shards[1].handle_eof(c.key);
    assert_eq!(cluster.shards[1].poll_dead(), Some(c.key));
    cluster.shards[1].remove(c.key);
    cluster.settle();
    assert_eq!(cluster.home_counts(&channel), [0, 0]);
}

/// io_uring sends a lone frame from the outbox, and the send may complete after the
/// connection died: the frame stays, at the same address, until the connection is removed.
#[test]
fn a_dead_connection_keeps_the_frame_a_send_reads_until_removed() {
    let mut cluster = Cluster::new(1, Config::default());
    let c = cluster.connect(0, "/ws");
    cluster.send(c, r#"{"type":"subscribe","channel":"a"}"#);
    cluster.settle();
    let shard = &mut cluster.shards[0];
    let sent = shard.outbox(c.key).start_lone().expect("the reply").clone();
    shard
        .read_buffer(c.key)
        .extend_from_slice(b"\x88\x80\0\0\0\0");
    shard.handle_read(c.key, cluster.now);
    shard.handle_eof(c.key);
    assert_eq!(shard.poll_dead(), Some(c.key));
    let mut slices = [std::io::IoSlice::new(&[]); 4];
    assert_eq!(
        shard.outbox(c.key).io_slices(&mut slices),
        1,
        "only the started frame"
    );
    assert_eq!(slices[0].as_ptr(), sent.as_ptr());
    assert_eq!(&*slices[0], &sent[..]);
    shard.remove(c.key);
}

#[test]
fn refuses_duplicate_and_unknown_subscriptions_and_too_many() {
    let config = Config {
        max_subscriptions: 1,
        ..Config::default()
    };
    let mut cluster = Cluster::new(1, config);
    let c = cluster.connect(0, "/ws");
    cluster.send(c, r#"{"type":"subscribe","channel":"a"}"#);
    cluster.send(c, r#"{"type":"subscribe","channel":"a","id":2}"#);
    cluster.send(c, r#"{"type":"subscribe","channel":"b","id":3}"#);
    cluster.send(c, r#"{"type":"unsubscribe","channel":"zz","id":4}"#);
    cluster.settle();
    let codes: Vec<String> = cluster
        .texts(c)
        .into_iter()
        .filter(|t| t.contains("error"))
        .collect();
    assert!(
        codes[0].contains(r#""code":"already_subscribed""#),
        "{codes:?}"
    );
    assert!(
        codes[1].contains(r#""code":"too_many_subscriptions""#),
        "{codes:?}"
    );
    assert!(codes[2].contains(r#""code":"not_subscribed""#), "{codes:?}");
}
