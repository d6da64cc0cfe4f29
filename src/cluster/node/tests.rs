//! The node's decisions driven by hand: each test plays Redis, feeding the replies a
//! real one would give, and reads what the node hands the shards.

use super::deliver::parse_announcement;
use super::*;
use crate::shard::ConnRef;

const CONN: ConnRef = ConnRef {
    key: 7,
    generation: 1,
};

fn node() -> Node {
    let mut node = Node::new(2, 4, Arc::new(Link::default()));
    node.handle_link_up();
    assert!(node.poll_action().is_none(), "nothing held, nothing to do");
    node
}

fn subscribe(channel: &str, shard: usize, since: Option<u64>, epoch: Option<&str>) -> Request {
    Request::Subscribe {
        channel: channel.into(),
        shard,
        conn: CONN,
        ticket: 3,
        since,
        epoch: epoch.map(Into::into),
        id: Some(9),
        max_replay_bytes: 1 << 20,
    }
}

/// What the node did, as text: `send ...`, `broadcast ...`, and at most one command last.
fn drain(node: &mut Node) -> Vec<String> {
    let mut done = Vec::new();
    while let Some(action) = node.poll_action() {
        done.push(match action {
            Action::Send {
                shard,
                envelope: Envelope::Subscribed { answer, replay },
            } => {
                let seqs: Vec<u64> = replay.iter().map(|(s, _)| *s).collect();
                format!(
                    "subscribed shard {shard} seq {} epoch {} replay {seqs:?}",
                    answer.seq,
                    answer.epoch.as_deref().unwrap_or("-")
                )
            }
            Action::Send {
                shard,
                envelope: Envelope::HistoryGap { answer, oldest },
            } => format!(
                "history_gap shard {shard} seq {} oldest {oldest}",
                answer.seq
            ),
            Action::Send { envelope, .. } => panic!("unexpected envelope {envelope:?}"),
            Action::Broadcast {
                seq, frame, shards, ..
            } => {
                let text = String::from_utf8_lossy(&frame);
                let kind = ["message", "gap", "subscribed"]
                    .into_iter()
                    .find(|k| text.contains(&format!("\"type\":\"{k}\"")))
                    .unwrap_or("?");
                format!("broadcast {kind} {seq} to {shards:?}")
            }
            Action::Event { frame, shards, .. } => {
                let text = String::from_utf8_lossy(&frame);
                let kind = if text.contains("\"type\":\"join\"") {
                    "join"
                } else {
                    "leave"
                };
                format!("event {kind} to {shards:?}")
            }
            Action::Command(command) => format!("{command:?}"),
        });
    }
    done
}

fn meta(channel: &str, epoch: &str, seq: u64) -> String {
    format!(
        "{:?}",
        Command::ReadMeta {
            channel: channel.into(),
            known_epoch: epoch.into(),
            known_seq: seq,
        }
    )
}

fn read(channel: &str, from: u64, to: u64) -> String {
    format!(
        "{:?}",
        Command::ReadStream {
            channel: channel.into(),
            from,
            to,
            count: 4,
        }
    )
}

fn entries(seqs: &[u64]) -> Reply {
    Reply::Entries(
        seqs.iter()
            .map(|s| (*s, Bytes::from(format!("{{\"n\":{s}}}"))))
            .collect(),
    )
}

fn announce(node: &mut Node, channel: &str, seq: u64, epoch: &str) {
    node.handle_announcement(
        channel,
        Bytes::from(format!("{seq} {epoch} {{\"n\":{seq}}}")),
    );
}

/// A node with one subscriber on shard 1 of `news`, live at seq 5 of epoch `e1`.
fn live_at_5() -> Node {
    let mut node = node();
    node.handle_request(subscribe("news", 1, None, None));
    assert_eq!(drain(&mut node), [r#"Subscribe(["news"])"#]);
    node.handle_reply(Reply::Done);
    assert_eq!(drain(&mut node), [meta("news", "", 0)]);
    node.handle_reply(Reply::Meta {
        epoch: "e1".into(),
        seq: 5,
    });
    assert_eq!(
        drain(&mut node),
        ["subscribed shard 1 seq 5 epoch e1 replay []"]
    );
    node
}

#[test]
fn announcements_keep_the_data_bytes() {
    assert_eq!(
        parse_announcement(br#"42 k3x9 {"a": [1, 2]}"#),
        Some((42, "k3x9", &br#"{"a": [1, 2]}"#[..]))
    );
    assert_eq!(parse_announcement(b"x k3x9 1"), None);
    assert_eq!(parse_announcement(b"42"), None);
}

#[test]
fn joins_and_leaves_keep_their_place_among_the_messages_holes_filled_first() {
    let mut node = live_at_5();
    let event = |kind: &str| {
        Bytes::from(format!(
            r#"E {{"type":"{kind}","channel":"news","conn":"n/0.1.1","user":"ann"}}"#
        ))
    };
    announce(&mut node, "news", 6, "e1");
    node.handle_announcement("news", event("join"));
    // 8 shows a hole: 7 is read from the stream before 8, and the leave after both.
    announce(&mut node, "news", 8, "e1");
    node.handle_announcement("news", event("leave"));
    assert_eq!(
        drain(&mut node),
        [
            "broadcast message 6 to [1]".to_string(),
            "event join to [1]".to_string(),
            read("news", 7, 7)
        ]
    );
    node.handle_reply(entries(&[7]));
    assert_eq!(
        drain(&mut node),
        [
            "broadcast message 7 to [1]",
            "broadcast message 8 to [1]",
            "event leave to [1]"
        ]
    );
    node.handle_announcement("other", event("join"));
    assert!(drain(&mut node).is_empty(), "a channel nobody here holds");
}

#[test]
fn the_first_subscriber_subscribes_in_redis_and_later_ones_are_answered_at_once() {
    let mut node = live_at_5();
    node.handle_request(subscribe("news", 0, None, None));
    assert_eq!(
        drain(&mut node),
        ["subscribed shard 0 seq 5 epoch e1 replay []"]
    );
    announce(&mut node, "news", 6, "e1");
    assert_eq!(drain(&mut node), ["broadcast message 6 to [0, 1]"]);
}

#[test]
fn duplicates_and_old_announcements_are_dropped() {
    let mut node = live_at_5();
    for seq in [6, 6, 5, 3] {
        announce(&mut node, "news", seq, "e1");
    }
    assert_eq!(drain(&mut node), ["broadcast message 6 to [1]"]);
    announce(&mut node, "other", 1, "e1");
    assert!(drain(&mut node).is_empty(), "a channel nobody here holds");
    node.handle_announcement("news", Bytes::from_static(b"garbage"));
    assert!(drain(&mut node).is_empty());
}

#[test]
fn a_delivered_seq_reused_with_other_data_starts_a_new_epoch() {
    let mut node = live_at_5();
    announce(&mut node, "news", 6, "e1");
    assert_eq!(drain(&mut node), ["broadcast message 6 to [1]"]);
    // The same message again (a catch-up overlapping the announcement): dropped.
    announce(&mut node, "news", 6, "e1");
    assert!(drain(&mut node).is_empty());
    // Seq 6 again with other data: Redis lost ours and numbered a new message 6.
    node.handle_announcement("news", Bytes::from_static(b"6 e1 \"other\""));
    assert_eq!(drain(&mut node), [meta("news", "e1", u64::MAX)]);
    node.handle_reply(Reply::Meta {
        epoch: "e2".into(),
        seq: 0,
    });
    assert_eq!(drain(&mut node), ["broadcast subscribed 0 to [1]"]);
}

#[test]
fn a_hole_is_filled_from_the_stream_before_the_announcement() {
    let mut node = live_at_5();
    announce(&mut node, "news", 9, "e1");
    assert_eq!(drain(&mut node), [read("news", 6, 8)]);
    node.handle_reply(entries(&[6, 7, 8]));
    assert_eq!(
        drain(&mut node),
        [
            "broadcast message 6 to [1]",
            "broadcast message 7 to [1]",
            "broadcast message 8 to [1]",
            "broadcast message 9 to [1]",
        ]
    );
}

#[test]
fn what_the_stream_no_longer_holds_is_announced_as_a_gap() {
    let mut node = live_at_5();
    announce(&mut node, "news", 10, "e1");
    assert_eq!(drain(&mut node), [read("news", 6, 9)]);
    node.handle_reply(entries(&[8]));
    assert_eq!(
        drain(&mut node),
        [
            "broadcast gap 7 to [1]",
            "broadcast message 8 to [1]",
            "broadcast gap 9 to [1]",
            "broadcast message 10 to [1]",
        ]
    );
}

#[test]
fn another_epoch_announced_is_a_rollback_the_subscribers_are_told_of() {
    let link = Arc::new(Link::default());
    let mut node = live_at_5();
    node.link = link.clone();
    announce(&mut node, "news", 1, "e2");
    assert_eq!(drain(&mut node), [meta("news", "e1", 5)]);
    node.handle_reply(Reply::Meta {
        epoch: "e2".into(),
        seq: 2,
    });
    assert_eq!(
        drain(&mut node),
        ["broadcast subscribed 0 to [1]", &read("news", 1, 2)]
    );
    node.handle_reply(entries(&[1, 2]));
    assert_eq!(
        drain(&mut node),
        ["broadcast message 1 to [1]", "broadcast message 2 to [1]"]
    );
    assert_eq!(
        link.epoch_changes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A `since` of the old epoch is a history gap, whatever its number.
    node.handle_request(subscribe("news", 0, Some(1), Some("e1")));
    assert_eq!(drain(&mut node), [r#"ReadOldest { channel: "news" }"#]);
    node.handle_reply(entries(&[1]));
    assert_eq!(drain(&mut node), ["history_gap shard 0 seq 2 oldest 1"]);
}

#[test]
fn a_reconnecting_client_replays_from_the_recent_ring_without_redis() {
    let mut node = live_at_5();
    for seq in 6..=8 {
        announce(&mut node, "news", seq, "e1");
    }
    assert_eq!(drain(&mut node).len(), 3);
    node.handle_request(subscribe("news", 0, Some(6), Some("e1")));
    assert_eq!(
        drain(&mut node),
        ["subscribed shard 0 seq 8 epoch e1 replay [7, 8]"]
    );
}

#[test]
fn a_replay_the_ring_cannot_serve_is_read_from_the_stream_or_is_a_gap() {
    let mut node = live_at_5();
    node.handle_request(subscribe("news", 0, Some(2), Some("e1")));
    assert_eq!(drain(&mut node), [read("news", 3, 5)]);
    node.handle_reply(entries(&[3, 4, 5]));
    assert_eq!(
        drain(&mut node),
        ["subscribed shard 0 seq 5 epoch e1 replay [3, 4, 5]"]
    );
    node.handle_request(subscribe("news", 0, Some(2), Some("e1")));
    assert_eq!(drain(&mut node), [read("news", 3, 5)]);
    node.handle_reply(entries(&[4, 5]));
    assert_eq!(drain(&mut node), ["history_gap shard 0 seq 5 oldest 4"]);
    // Further back than one read returns: a gap without reading what cannot be sent.
    node.handle_request(subscribe("news", 0, Some(0), Some("e1")));
    assert_eq!(drain(&mut node), [r#"ReadOldest { channel: "news" }"#]);
    node.handle_reply(entries(&[]));
    assert_eq!(drain(&mut node), ["history_gap shard 0 seq 5 oldest 6"]);
}

#[test]
fn a_replay_is_cut_to_the_bytes_asked_for() {
    let mut node = live_at_5();
    for seq in 6..=8 {
        announce(&mut node, "news", seq, "e1");
    }
    drain(&mut node);
    let mut request = subscribe("news", 0, Some(5), Some("e1"));
    if let Request::Subscribe {
        max_replay_bytes, ..
    } = &mut request
    {
        *max_replay_bytes = 1;
    }
    node.handle_request(request);
    assert_eq!(
        drain(&mut node),
        ["subscribed shard 0 seq 8 epoch e1 replay [6]"]
    );
}

#[test]
fn a_since_ahead_of_the_node_waits_for_the_message_on_its_way() {
    let mut node = live_at_5();
    node.handle_request(subscribe("news", 0, Some(7), Some("e1")));
    assert_eq!(drain(&mut node), [meta("news", "e1", 5)]);
    node.handle_reply(Reply::Meta {
        epoch: "e1".into(),
        seq: 7,
    });
    assert!(
        drain(&mut node).is_empty(),
        "published, not yet announced here"
    );
    // Counted already: it receives what arrives while it waits.
    announce(&mut node, "news", 6, "e1");
    assert_eq!(
        drain(&mut node),
        ["broadcast message 6 to [0, 1]", &meta("news", "e1", 6)]
    );
    node.handle_reply(Reply::Meta {
        epoch: "e1".into(),
        seq: 7,
    });
    assert!(drain(&mut node).is_empty());
    announce(&mut node, "news", 7, "e1");
    assert_eq!(
        drain(&mut node),
        [
            "broadcast message 7 to [0, 1]",
            "subscribed shard 0 seq 7 epoch e1 replay []",
        ]
    );
    // From the future: a gap.
    node.handle_request(subscribe("news", 0, Some(50), Some("e1")));
    assert_eq!(drain(&mut node), [meta("news", "e1", 7)]);
    node.handle_reply(Reply::Meta {
        epoch: "e1".into(),
        seq: 7,
    });
    assert_eq!(drain(&mut node), [r#"ReadOldest { channel: "news" }"#]);
    node.handle_reply(entries(&[1]));
    assert_eq!(drain(&mut node), ["history_gap shard 0 seq 7 oldest 4"]);
}

#[test]
fn a_lost_link_keeps_every_subscription_and_catches_up_when_back() {
    let mut node = live_at_5();
    node.handle_request(subscribe("news", 0, Some(2), Some("e1")));
    assert_eq!(drain(&mut node), [read("news", 3, 5)]);
    node.handle_link_lost();
    announce(&mut node, "news", 6, "e1");
    assert!(
        drain(&mut node).is_empty(),
        "not live: nothing until caught up"
    );
    node.handle_request(subscribe("news", 0, None, None));
    assert!(drain(&mut node).is_empty(), "waits for the link");
    node.handle_link_up();
    assert_eq!(drain(&mut node), [r#"Subscribe(["news"])"#]);
    node.handle_reply(Reply::Done);
    assert_eq!(drain(&mut node), [meta("news", "e1", 5)]);
    node.handle_reply(Reply::Meta {
        epoch: "e1".into(),
        seq: 7,
    });
    assert_eq!(drain(&mut node), [read("news", 6, 7)]);
    node.handle_reply(entries(&[6, 7]));
    assert_eq!(
        drain(&mut node),
        [
            "broadcast message 6 to [0, 1]",
            "broadcast message 7 to [0, 1]",
            // The subscription whose replay the loss cut short is answered now: since 2
            // is further back than one read (history 4) from 7.
            r#"ReadOldest { channel: "news" }"#,
        ]
    );
    node.handle_reply(entries(&[3]));
    assert_eq!(
        drain(&mut node),
        [
            "history_gap shard 0 seq 7 oldest 4",
            "subscribed shard 0 seq 7 epoch e1 replay []",
        ]
    );
}

#[test]
fn a_failed_command_names_its_channel_which_is_subscribed_again_when_lost() {
    let mut node = live_at_5();
    announce(&mut node, "news", 8, "e1");
    assert_eq!(drain(&mut node), [read("news", 6, 7)]);
    let lost = node.handle_failure();
    assert_eq!(lost, [ChannelName::from("news")]);
    assert!(drain(&mut node).is_empty());
    node.handle_channel_lost("news");
    assert_eq!(drain(&mut node), [r#"Subscribe(["news"])"#]);
    node.handle_reply(Reply::Done);
    assert_eq!(drain(&mut node), [meta("news", "e1", 5)]);
    node.handle_reply(Reply::Meta {
        epoch: "e1".into(),
        seq: 8,
    });
    assert_eq!(drain(&mut node), [read("news", 6, 8)]);
    node.handle_reply(entries(&[6, 7, 8]));
    assert_eq!(drain(&mut node).len(), 3);
}

#[test]
fn a_resubscription_by_redis_catches_up_what_was_announced_meanwhile() {
    let mut node = live_at_5();
    node.handle_resubscribed("news");
    assert_eq!(drain(&mut node), [meta("news", "e1", 5)]);
    node.handle_reply(Reply::Meta {
        epoch: "e1".into(),
        seq: 6,
    });
    assert_eq!(drain(&mut node), [read("news", 6, 6)]);
    node.handle_reply(entries(&[6]));
    assert_eq!(drain(&mut node), ["broadcast message 6 to [1]"]);
    node.handle_resubscribed("unknown");
    assert!(drain(&mut node).is_empty());
}

#[test]
fn the_last_leaver_unsubscribes_in_redis_and_the_channel_is_forgotten() {
    let mut node = live_at_5();
    node.handle_request(Request::Unsubscribe {
        channel: "news".into(),
        shard: 1,
    });
    assert_eq!(drain(&mut node), [r#"Unsubscribe("news")"#]);
    node.handle_reply(Reply::Done);
    announce(&mut node, "news", 6, "e1");
    assert!(drain(&mut node).is_empty());
    assert_eq!(node.channels().count(), 0);
}

/// A node whose `state.` channels recover `latest`.
fn latest_node() -> Node {
    let latest = HistoryLimits {
        size: 1,
        ttl: std::time::Duration::MAX,
        latest: true,
    };
    let mut node = Node::new(2, 4, Arc::new(Link::default())).with_history(HistoryPolicy {
        default: HistoryLimits {
            size: 4,
            ttl: std::time::Duration::from_secs(60),
            latest: false,
        },
        by_prefix: vec![("state.".into(), latest)],
    });
    node.handle_link_up();
    node
}

#[test]
fn a_latest_channel_starts_a_subscriber_without_since_from_its_latest_message() {
    let mut node = latest_node();
    node.handle_request(subscribe("state.n", 1, None, None));
    assert_eq!(drain(&mut node), [r#"Subscribe(["state.n"])"#]);
    node.handle_reply(Reply::Done);
    assert_eq!(drain(&mut node), [meta("state.n", "", 0)]);
    node.handle_reply(Reply::Meta {
        epoch: "e1".into(),
        seq: 9,
    });
    // Nothing of it reached this node yet: the latest is read from the stream.
    let read_latest = format!(
        "{:?}",
        Command::ReadStream {
            channel: "state.n".into(),
            from: 9,
            to: 9,
            count: 1,
        }
    );
    assert_eq!(drain(&mut node), [read_latest]);
    node.handle_reply(entries(&[9]));
    assert_eq!(
        drain(&mut node),
        ["subscribed shard 1 seq 9 epoch e1 replay [9]"]
    );
    // Once a message came through, the next subscriber gets it from the node's ring.
    announce(&mut node, "state.n", 10, "e1");
    assert_eq!(drain(&mut node), ["broadcast message 10 to [1]"]);
    node.handle_request(subscribe("state.n", 0, None, None));
    assert_eq!(
        drain(&mut node),
        ["subscribed shard 0 seq 10 epoch e1 replay [10]"]
    );
    // A value gone from the stream: the subscriber starts live.
    node.handle_request(subscribe("state.empty", 0, None, None));
    drain(&mut node);
    node.handle_reply(Reply::Done);
    drain(&mut node);
    node.handle_reply(Reply::Meta {
        epoch: "e1".into(),
        seq: 3,
    });
    drain(&mut node);
    node.handle_reply(entries(&[]));
    assert_eq!(
        drain(&mut node),
        ["subscribed shard 0 seq 3 epoch e1 replay []"]
    );
}

#[test]
fn a_stream_channel_starts_a_subscriber_without_since_live() {
    let mut node = latest_node();
    node.handle_request(subscribe("news", 1, None, None));
    drain(&mut node);
    node.handle_reply(Reply::Done);
    drain(&mut node);
    node.handle_reply(Reply::Meta {
        epoch: "e1".into(),
        seq: 9,
    });
    assert_eq!(
        drain(&mut node),
        ["subscribed shard 1 seq 9 epoch e1 replay []"]
    );
}
