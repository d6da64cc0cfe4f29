use super::*;

#[test]
fn keys_share_one_hash_tag_and_round_trip() {
    assert_eq!(meta_key("news"), "herald:{news}:meta");
    assert_eq!(stream_key("news"), "herald:{news}:stream");
    assert_eq!(channel_of(&pubsub_key("chat.room-1")), Some("chat.room-1"));
    assert_eq!(channel_of("other:{x}"), None);
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

#[test]
fn the_cluster_script_announces_on_the_channels_shard() {
    let sharded = publish_script(true);
    assert!(sharded.contains("redis.call('SPUBLISH', KEYS[3]"));
    assert!(!sharded.contains("redis.call('PUBLISH'"));
    assert!(publish_script(false).contains("redis.call('PUBLISH', KEYS[3]"));
}

#[test]
fn a_channels_keys_hash_to_one_slot() {
    use ::redis::cluster_routing::Slot;
    for channel in ["news", "chat.room-1", "a}b", "x{y}z", "{}", "}x", "}"] {
        let slot = Slot::for_key(meta_key(channel));
        assert_eq!(Slot::for_key(stream_key(channel)), slot, "{channel}");
        assert_eq!(Slot::for_key(pubsub_key(channel)), slot, "{channel}");
        assert_eq!(channel_of(&pubsub_key(channel)), Some(channel));
    }
}
