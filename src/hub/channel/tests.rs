//! The home's channel table: sequence, history, recovery, forgetting.

#![allow(clippy::disallowed_methods)] // tests start the clock they drive

use super::*;

fn name(s: &str) -> ChannelName {
    s.into()
}

fn limits(size: usize) -> HistoryLimits {
    HistoryLimits {
        size,
        ttl: Duration::from_secs(60),
        latest: false,
    }
}

#[test]
fn home_is_stable_and_in_range() {
    for shards in 1..8 {
        for c in ["a", "news", "chat.room.1"] {
            let h = home_of(c, shards);
            assert!(h < shards);
            assert_eq!(h, home_of(c, shards));
        }
    }
}

#[test]
fn sequence_increases_by_one_per_publish() {
    let now = Instant::now();
    let mut channels = Channels::new(2, limits(10));
    let news = name("news");
    let outcome = channels.subscribe(&news, 1, None, true, usize::MAX, now);
    assert_eq!(
        outcome,
        SubscribeOutcome::Subscribed {
            seq: 0,
            replay: vec![]
        }
    );
    for expect in 1..=3 {
        let published = channels.publish(&news, b"1", now);
        assert_eq!(published.broadcast.seq, expect);
        assert_eq!(published.shards, &[0, 1]);
        assert_eq!(published.subscribers, 1);
    }
}

#[test]
fn since_replays_what_was_missed() {
    let now = Instant::now();
    let mut channels = Channels::new(1, limits(10));
    let c = name("c");
    for _ in 0..5 {
        channels.publish(&c, b"1", now);
    }
    match channels.subscribe(&c, 0, Some(2), true, usize::MAX, now) {
        SubscribeOutcome::Subscribed { seq, replay } => {
            assert_eq!(seq, 5);
            // The seq carried beside each frame is that frame's own.
            let expected = [3, 4, 5].map(|s| (s, pubsub::encode_message(&c, s, b"1")));
            assert_eq!(replay, expected);
        }
        other => panic!("{other:?}"),
    }
    match channels.subscribe(&c, 0, Some(5), true, usize::MAX, now) {
        SubscribeOutcome::Subscribed { replay, .. } => assert!(replay.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn since_beyond_history_other_epoch_or_future_is_a_gap() {
    let now = Instant::now();
    let mut channels = Channels::new(1, limits(3));
    let c = name("c");
    for _ in 0..5 {
        channels.publish(&c, b"1", now);
    }
    let gap = SubscribeOutcome::HistoryGap { seq: 5, oldest: 3 };
    assert_eq!(
        channels.subscribe(&c, 0, Some(1), true, usize::MAX, now),
        gap
    );
    assert_eq!(
        channels.subscribe(&c, 0, Some(4), false, usize::MAX, now),
        gap
    );
    assert_eq!(
        channels.subscribe(&c, 0, Some(9), true, usize::MAX, now),
        gap
    );
    assert!(matches!(
        channels.subscribe(&c, 0, Some(2), true, usize::MAX, now),
        SubscribeOutcome::Subscribed { .. }
    ));
}

#[test]
fn history_expires_by_age() {
    let start = Instant::now();
    let mut channels = Channels::new(1, limits(100));
    let c = name("c");
    channels.publish(&c, b"1", start);
    channels.publish(&c, b"2", start + Duration::from_secs(50));
    let later = start + Duration::from_secs(70);
    assert_eq!(
        channels.subscribe(&c, 0, Some(0), true, usize::MAX, later),
        SubscribeOutcome::HistoryGap { seq: 2, oldest: 2 }
    );
    let much_later = start + Duration::from_secs(200);
    assert_eq!(
        channels.subscribe(&c, 0, Some(0), true, usize::MAX, much_later),
        SubscribeOutcome::HistoryGap { seq: 2, oldest: 3 }
    );
}

#[test]
fn a_namespace_prefix_sets_its_channels_history() {
    let now = Instant::now();
    let mut channels = Channels::new(1, limits(2)).with_prefixes(vec![
        ("feed.".into(), limits(5)),
        ("feed.none.".into(), limits(0)),
    ]);
    for name in ["news", "feed.a", "feed.none.a"] {
        let c = self::name(name);
        channels.subscribe(&c, 0, None, true, 0, now);
        for _ in 0..10 {
            channels.publish(&c, b"1", now);
        }
    }
    let oldest = |channels: &mut Channels, name: &str| match channels.subscribe(
        &self::name(name),
        0,
        Some(0),
        true,
        0,
        now,
    ) {
        SubscribeOutcome::HistoryGap { oldest, .. } => oldest,
        other => panic!("{other:?}"),
    };
    assert_eq!(oldest(&mut channels, "news"), 9);
    assert_eq!(oldest(&mut channels, "feed.a"), 6);
    assert_eq!(oldest(&mut channels, "feed.none.a"), 11);
}

#[test]
fn history_and_list_read_without_creating_channels() {
    let now = Instant::now();
    let mut channels = Channels::new(2, limits(10));
    for n in ["b", "a", "c"] {
        channels.publish(&name(n), b"1", now);
    }
    channels.subscribe(&name("b"), 1, None, true, 0, now);
    for _ in 0..4 {
        channels.publish(&name("b"), b"2", now);
    }
    let listed = channels.list(|n| n != "c", None, 10);
    assert_eq!(listed, [(name("a"), 0), (name("b"), 1)]);
    assert_eq!(channels.list(|_| true, Some("a"), 1), [(name("b"), 1)]);
    let seqs = |frames: &[Bytes]| -> Vec<u64> {
        frames
            .iter()
            .map(|f| {
                let text = String::from_utf8_lossy(f).into_owned();
                let rest = &text[text.find("\"seq\":").unwrap() + 6..];
                rest[..rest.find(',').unwrap()].parse().unwrap()
            })
            .collect()
    };
    let (seq, oldest, frames) = channels.history("b", Some(1), (2, false), usize::MAX, now);
    assert_eq!((seq, oldest, seqs(&frames)), (5, 1, vec![2, 3]));
    let (_, _, frames) = channels.history("b", None, (2, true), usize::MAX, now);
    assert_eq!(seqs(&frames), [5, 4]);
    let (_, _, frames) = channels.history("b", None, (10, false), 1, now);
    assert_eq!(frames.len(), 1, "at least one, within the bytes");
    assert_eq!(
        channels.history("nope", None, (10, false), 1, now).2,
        Vec::<Bytes>::new()
    );
    assert_eq!(channels.len(), 3, "asking created nothing");
}

#[test]
fn unsubscribe_stops_counting_the_shard() {
    let now = Instant::now();
    let mut channels = Channels::new(2, limits(0));
    let c = name("c");
    channels.subscribe(&c, 0, None, true, usize::MAX, now);
    channels.subscribe(&c, 1, None, true, usize::MAX, now);
    channels.unsubscribe(&c, 0);
    assert_eq!(channels.publish(&c, b"1", now).shards, &[0, 1]);
}

/// Calls the sweep every interval from `start` until `until`.
fn sweep_until(channels: &mut Channels, start: Instant, until: Instant) {
    let mut now = start;
    while now <= until {
        channels.sweep(now);
        now += SWEEP_INTERVAL;
    }
}

#[test]
fn a_channel_nobody_holds_or_keeps_is_forgotten_at_once() {
    let now = Instant::now();
    let mut channels = Channels::new(2, limits(10));
    for i in 0..100 {
        let c = name(&format!("c{i}"));
        channels.subscribe(&c, i % 2, None, true, usize::MAX, now);
        channels.unsubscribe(&c, i % 2);
    }
    assert!(channels.is_empty(), "{} left", channels.len());
    assert_eq!(channels.next_sweep(), None, "nothing to sweep for");
    // Without history a publish nobody receives is not kept either.
    let mut no_history = Channels::new(1, limits(0));
    let published = no_history.publish(&name("x"), b"1", now);
    assert_eq!((published.subscribers, published.shards), (0, &[][..]));
    assert!(no_history.is_empty());
    assert_eq!(no_history.publish(&name("x"), b"2", now).broadcast.seq, 2);
}

#[test]
fn the_sweep_expires_history_of_channels_never_used_again() {
    let start = Instant::now();
    let ttl = Duration::from_secs(2);
    let mut channels = Channels::new(
        1,
        HistoryLimits {
            size: 10,
            ttl,
            latest: false,
        },
    );
    let held = name("held");
    channels.subscribe(&held, 0, None, true, usize::MAX, start);
    channels.publish(&held, b"1", start);
    for i in 0..10_000 {
        channels.publish(&name(&format!("c{i}")), b"1", start);
    }
    assert_eq!(channels.len(), 10_001);
    // Within the TTL nothing goes.
    sweep_until(&mut channels, start, start + ttl);
    assert_eq!(channels.len(), 10_001);
    // A sweep visits a share only: the work per tick is bounded.
    let expired = start + ttl + SWEEP_INTERVAL;
    channels.sweep(expired);
    let after_one = channels.len();
    assert!(
        (9_000..10_001).contains(&after_one),
        "one sweep forgot {} channels",
        10_001 - after_one
    );
    // Within a round (1 s for this TTL) every one is visited.
    sweep_until(
        &mut channels,
        expired,
        expired + Duration::from_secs(1) + SWEEP_INTERVAL,
    );
    assert_eq!(channels.len(), 1, "only the subscribed channel stays");
    assert!(
        channels.map.capacity() < 1000,
        "{}",
        channels.map.capacity()
    );
    assert_eq!(
        channels.subscribe(&held, 0, Some(0), true, usize::MAX, expired),
        SubscribeOutcome::HistoryGap { seq: 1, oldest: 2 },
        "its history was trimmed by the sweep"
    );
}

#[test]
fn a_recreated_channel_never_reuses_a_seq_and_an_old_since_is_a_gap() {
    let start = Instant::now();
    let ttl = Duration::from_secs(1);
    let mut channels = Channels::new(
        1,
        HistoryLimits {
            size: 10,
            ttl,
            latest: false,
        },
    );
    let c = name("c");
    for _ in 0..5 {
        channels.publish(&c, b"1", start);
    }
    let later = start + Duration::from_secs(5);
    sweep_until(&mut channels, later, later + Duration::from_secs(2));
    assert!(channels.is_empty());
    // A client that read up to 3 missed 4 and 5: a gap, not seq 4 of a new channel.
    assert_eq!(
        channels.subscribe(&c, 0, Some(3), true, usize::MAX, later),
        SubscribeOutcome::HistoryGap { seq: 5, oldest: 6 }
    );
    // One that read everything continues; so does numbering.
    assert_eq!(
        channels.subscribe(&c, 0, Some(5), true, usize::MAX, later),
        SubscribeOutcome::Subscribed {
            seq: 5,
            replay: vec![]
        }
    );
    assert_eq!(channels.publish(&c, b"1", later).broadcast.seq, 6);
    // `since=0` claims nothing was seen: messages 1-5 were.
    assert!(matches!(
        channels.subscribe(&c, 0, Some(0), true, usize::MAX, later),
        SubscribeOutcome::HistoryGap { oldest: 6, .. }
    ));
    // A name in another bucket starts from 0 as before.
    let other = (0..)
        .map(|i| name(&format!("o{i}")))
        .find(|n| floor_bucket(n) != floor_bucket(&c))
        .unwrap();
    assert_eq!(channels.publish(&other, b"1", later).broadcast.seq, 1);
}

#[test]
fn replay_goes_out_in_chunks_of_at_most_the_bytes_asked_for() {
    let now = Instant::now();
    let mut channels = Channels::new(
        1,
        HistoryLimits {
            size: 100,
            ttl: Duration::from_secs(60),
            latest: false,
        },
    );
    let c = name("c");
    for _ in 0..10 {
        channels.publish(&c, &[b'1'; 100], now);
    }
    let frame_len = pubsub::encode_message(&c, 1, &[b'1'; 100]).len();
    let seqs = |outcome: SubscribeOutcome| match outcome {
        SubscribeOutcome::Subscribed { seq, replay } => (
            seq,
            replay.iter().map(|(_, f)| f.len()).sum::<usize>(),
            replay.len(),
        ),
        SubscribeOutcome::HistoryGap { .. } => panic!("gap"),
    };
    assert_eq!(
        seqs(channels.subscribe(&c, 0, Some(0), true, 0, now)),
        (10, 0, 0)
    );
    let (seq, bytes, count) =
        seqs(channels.subscribe(&c, 0, Some(2), true, 3 * frame_len + 1, now));
    assert_eq!((seq, bytes, count), (10, 3 * frame_len, 3));
    // At least one message, however small the chunk asked for.
    assert_eq!(seqs(channels.replay(&c, 5, 1, now)).2, 1);
    assert_eq!(seqs(channels.replay(&c, 8, usize::MAX, now)).2, 2);
    assert_eq!(seqs(channels.replay(&c, 10, usize::MAX, now)).2, 0);
    assert!(matches!(
        channels.replay(&c, 11, 1, now),
        SubscribeOutcome::HistoryGap { .. }
    ));
}

#[test]
fn a_latest_channel_gives_a_new_subscriber_its_last_message_even_past_the_old_ttl() {
    let start = Instant::now();
    let latest = HistoryLimits {
        size: 1,
        ttl: Duration::MAX,
        latest: true,
    };
    let mut channels = Channels::new(1, limits(10)).with_prefixes(vec![("state.".into(), latest)]);
    let (state, plain) = (name("state.counter"), name("news"));
    assert_eq!(
        channels.subscribe(&state, 0, None, true, 0, start),
        SubscribeOutcome::Subscribed {
            seq: 0,
            replay: Vec::new()
        },
        "nothing published yet: nothing to start from"
    );
    channels.unsubscribe(&state, 0);
    for data in [b"1", b"2"] {
        channels.publish(&state, data, start);
        channels.publish(&plain, data, start);
    }
    // Long after any history TTL: the latest is kept, and the channel with it.
    let later = start + Duration::from_secs(86_400);
    channels.sweep(later);
    let SubscribeOutcome::Subscribed { seq, replay } =
        channels.subscribe(&state, 0, None, true, 0, later)
    else {
        panic!("subscribed");
    };
    assert_eq!(seq, 2);
    assert_eq!(replay.len(), 1);
    assert_eq!(replay[0].0, 2);
    assert_eq!(
        replay[0].1,
        pubsub::encode_published("state.counter", 2, None, b"2")
    );
    // A `since` is served as before: from history, which holds one message.
    assert_eq!(
        channels.subscribe(&state, 0, Some(0), true, 1 << 20, later),
        SubscribeOutcome::HistoryGap { seq: 2, oldest: 2 }
    );
    // A stream channel starts live.
    assert_eq!(
        channels.subscribe(&plain, 0, None, true, 1 << 20, start),
        SubscribeOutcome::Subscribed {
            seq: 2,
            replay: Vec::new()
        }
    );
}

#[test]
fn expect_seq_stores_only_on_the_expected_seq_and_a_refusal_keeps_nothing() {
    let now = Instant::now();
    let mut channels = Channels::new(1, limits(10));
    let c = name("counter");
    let published = channels.publish_from(&c, None, b"1", Some(0), now);
    assert_eq!(published.map(|p| p.broadcast.seq).ok(), Some(1));
    assert_eq!(
        channels.publish_from(&c, None, b"2", Some(0), now).err(),
        Some(Conflict { seq: 1 })
    );
    assert_eq!(
        channels
            .history("counter", None, (10, false), 1 << 20, now)
            .2
            .len(),
        1,
        "the refused publish is not stored"
    );
    let published = channels.publish_from(&c, None, b"2", Some(1), now);
    assert_eq!(published.map(|p| p.broadcast.seq).ok(), Some(2));
    // A channel not known here is refused without being created.
    let mut fresh = Channels::new(1, limits(10));
    assert_eq!(
        fresh
            .publish_from(&name("x"), None, b"1", Some(5), now)
            .err(),
        Some(Conflict { seq: 0 })
    );
    assert!(fresh.is_empty());
}
