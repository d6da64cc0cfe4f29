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
