use super::*;

#[test]
fn keys_share_one_hash_tag_and_round_trip() {
    assert_eq!(meta_key("news"), "herald:{news}:meta");
    assert_eq!(stream_key("news"), "herald:{news}:stream");
    assert_eq!(channel_of(&pubsub_key("chat.room-1")), Some("chat.room-1"));
    assert_eq!(channel_of("other:{x}"), None);
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
fn the_publishers_memory_keeps_recent_channels_and_is_bounded() {
    let mut seen = Seen::new(3);
    for (i, channel) in ["a", "b", "c"].into_iter().enumerate() {
        seen.insert(channel.into(), "e".into(), i as u64 + 1);
    }
    // Published to again: kept through the next turnover, with its latest seq.
    seen.insert("a".into(), "e".into(), 10);
    seen.insert("d".into(), "e".into(), 1);
    assert_eq!(seen.get("a"), Some(&("e".into(), 10)));
    seen.insert("a".into(), "e".into(), 11);
    for i in 0..10_000 {
        seen.insert(format!("x{i}").into(), "e".into(), 1);
        assert!(seen.current.len() + seen.previous.len() <= 6);
    }
    assert_eq!(
        seen.get("a"),
        None,
        "left alone for a generation: forgotten"
    );
    assert!(seen.get("x9999").is_some());
}

#[test]
fn stream_entries_are_read_in_order() {
    let entry = |id: &str, data: &str| {
        Value::Array(vec![
            Value::BulkString(id.as_bytes().to_vec()),
            Value::Array(vec![
                Value::BulkString(b"d".to_vec()),
                Value::BulkString(data.as_bytes().to_vec()),
            ]),
        ])
    };
    let value = Value::Array(vec![entry("3-0", "\"c\""), entry("4-0", "[1]")]);
    assert_eq!(
        stream_entries(value),
        vec![
            (3, Bytes::from_static(b"\"c\"")),
            (4, Bytes::from_static(b"[1]"))
        ]
    );
}
