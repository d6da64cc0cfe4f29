//! `since`: history gaps, replays that continue live, replays paced in chunks.

use super::*;

#[test]
fn since_that_history_cannot_serve_is_a_history_gap() {
    let config = Config {
        history: hub::HistoryLimits {
            size: 1,
            ttl: Duration::from_secs(60),
            latest: false,
        },
        ..Config::default()
    };
    let mut cluster = Cluster::new(2, config);
    let p = cluster.connect(0, "/ws");
    for n in 1..=3 {
        cluster.send(
            p,
            &format!(r#"{{"type":"publish","channel":"c","data":{n}}}"#),
        );
    }
    cluster.settle();
    let c = cluster.connect(1, "/ws");
    cluster.send(c, r#"{"type":"subscribe","channel":"c","since":1,"id":9}"#);
    cluster.send(
        c,
        r#"{"type":"subscribe","channel":"d","since":0,"epoch":"old","id":10}"#,
    );
    // A second subscribe to "c" on `c` would be refused while the first is pending.
    let current = cluster.connect(1, "/ws");
    cluster.send(
        current,
        r#"{"type":"subscribe","channel":"c","since":2,"epoch":"e1","id":11}"#,
    );
    cluster.settle();
    let mut texts = cluster.texts(c);
    texts.extend(cluster.texts(current));
    // Replies from different homes may come in either order: find each by its id.
    let reply = |id: &str| texts.iter().find(|t| t.contains(id)).unwrap().clone();
    assert!(
        reply(r#""id":9"#).starts_with(
            r#"{"type":"error","code":"history_gap","channel":"c","seq":3,"oldest":3,"#
        ),
        "{texts:?}"
    );
    assert!(reply(r#""id":10"#).contains(r#""code":"history_gap""#));
    assert!(reply(r#""id":11"#).starts_with(r#"{"type":"subscribed","channel":"c","seq":3"#));
    assert!(texts.iter().any(|t| t.contains(r#""seq":3,"data":3"#)));
    assert_eq!(cluster.home_counts("c"), [0, 1]);
}

#[test]
fn since_replays_then_continues_live_without_gap_or_duplicate() {
    let mut cluster = Cluster::new(2, Config::default());
    let channel = homed_on(0, 2);
    let p = cluster.connect(0, "/ws");
    let publish = |cluster: &mut Cluster, n: u32| {
        cluster.send(
            p,
            &format!(r#"{{"type":"publish","channel":"{channel}","data":{n}}}"#),
        );
    };
    for n in 1..=5 {
        publish(&mut cluster, n);
    }
    cluster.settle();
    let c = cluster.connect(1, "/ws");
    cluster.send(
        c,
        &format!(r#"{{"type":"subscribe","channel":"{channel}","since":2}}"#),
    );
    // Published while the subscribe travels to the home: must come after the replay.
    publish(&mut cluster, 6);
    cluster.settle();
    publish(&mut cluster, 7);
    cluster.settle();
    let texts = cluster.texts(c);
    let seqs: Vec<&str> = texts
        .iter()
        .map(|t| {
            let rest = &t[t.find("\"seq\":").unwrap() + 6..];
            &rest[..rest.find(',').unwrap()]
        })
        .collect();
    assert_eq!(seqs, ["3", "4", "5", "6", "6", "7"], "{texts:?}");
    assert!(texts[4].starts_with(r#"{"type":"subscribed""#), "{texts:?}");
}

#[test]
fn a_replay_larger_than_the_budget_goes_out_in_chunks_as_the_socket_drains() {
    let budget = 4096;
    let config = Config {
        outbound_queue_bytes: budget,
        ..Config::default()
    };
    let mut cluster = Cluster::new(2, config);
    let channel = homed_on(0, 2);
    let p = cluster.connect(0, "/ws");
    let data = format!("\"{}\"", "x".repeat(500));
    let publish = |cluster: &mut Cluster| {
        cluster.send(
            p,
            &format!(r#"{{"type":"publish","channel":"{channel}","data":{data}}}"#),
        );
    };
    // 60 messages of ~560 bytes: eight times the subscriber's budget.
    for _ in 0..60 {
        publish(&mut cluster);
    }
    cluster.settle();
    let c = cluster.connect(1, "/ws");
    cluster.send(
        c,
        &format!(r#"{{"type":"subscribe","channel":"{channel}","since":0,"id":9}}"#),
    );
    let mut bytes = Vec::new();
    for round in 0..200 {
        cluster.settle();
        let queued = cluster.shards[1].outbox(c.key).len_bytes();
        assert!(
            queued <= budget + 600,
            "round {round}: {queued} bytes queued"
        );
        // Live messages keep coming while the replay goes out.
        if round % 5 == 0 && round < 100 {
            publish(&mut cluster);
        }
        bytes.extend(cluster.write_out(c, 1500));
    }
    let texts: Vec<String> = Cluster::parse_frames(&bytes)
        .into_iter()
        .map(|(_, p)| String::from_utf8(p).unwrap())
        .collect();
    let subscribed = texts
        .iter()
        .position(|t| t.starts_with(r#"{"type":"subscribed""#))
        .expect("subscribed after the replay");
    assert!(
        texts[subscribed].contains(r#""id":9"#),
        "{}",
        texts[subscribed]
    );
    let seqs: Vec<u64> = texts
        .iter()
        .filter(|t| t.starts_with(r#"{"type":"message""#))
        .map(|t| seq_of(t))
        .collect();
    // Every message once, in order, from 1 to the last published.
    assert_eq!(seqs, (1..=80).collect::<Vec<u64>>());
    assert_eq!(seq_of(&texts[subscribed]), seqs[subscribed - 1]);
}

/// The built-in `state.` namespace recovers `latest`, and `expect_seq` guards its writes:
/// a stale write is answered `conflict` with the current seq, nothing stored or sent.
#[test]
fn a_latest_channel_starts_from_its_value_and_a_stale_write_is_a_conflict() {
    let mut cluster = Cluster::new(2, Config::default());
    let (a, b) = (cluster.connect(0, "/ws"), cluster.connect(1, "/ws"));
    cluster.send(
        a,
        r#"{"type":"publish","channel":"state.n","data":1,"expect_seq":0,"id":1}"#,
    );
    cluster.settle();
    cluster.send(
        b,
        r#"{"type":"publish","channel":"state.n","data":5,"expect_seq":0,"id":2}"#,
    );
    cluster.settle();
    assert_eq!(cluster.texts(a), [r#"{"type":"ack","id":1,"seq":1}"#]);
    let conflict = cluster.texts(b);
    assert_eq!(conflict.len(), 1, "{conflict:?}");
    assert!(
        conflict[0]
            .starts_with(r#"{"type":"error","code":"conflict","channel":"state.n","seq":1,"#),
        "{conflict:?}"
    );
    // A new subscriber without `since` gets the value first, then `subscribed`.
    let c = cluster.connect(1, "/ws");
    cluster.send(c, r#"{"type":"subscribe","channel":"state.n","id":3}"#);
    cluster.settle();
    let texts = cluster.texts(c);
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert_eq!(
        texts[0],
        r#"{"type":"message","channel":"state.n","seq":1,"data":1}"#
    );
    assert!(texts[1].starts_with(r#"{"type":"subscribed","channel":"state.n","seq":1"#));
}
