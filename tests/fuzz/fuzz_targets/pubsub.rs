//! The JSON front doors: `proto::pubsub::CommandParser::parse` (`/ws` commands) and
//! `http::publish::parse` (`POST /api/publish` bodies), on arbitrary bytes.
//!
//! Invariants, with serde_json as an independent oracle:
//! - never panics;
//! - an accepted command or body is valid JSON (an object), and its `channel` and `id` are
//!   what serde_json reads;
//! - every published `data` is a sub-slice of the input (zero copy), is itself valid JSON,
//!   and equals the `data` member serde_json reads from the whole document;
//! - a batch publishes exactly the messages of the `messages` array, in order;
//! - the parser is reusable: parsing the same bytes twice gives the same answer.
#![no_main]

use bytes::Bytes;
use herald::http::publish;
use herald::proto::pubsub::{Command, CommandParser};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);

    let mut parser = CommandParser::default();
    let command = parser.parse(&input);
    assert_eq!(command, parser.parse(&input), "parser state leaked between calls");
    if let Ok(command) = &command {
        let Some(doc) = oracle(&input) else { return };
        let object = doc.as_object().expect("accepted command is not a JSON object");
        let id = match command {
            Command::Subscribe { channel, id, .. }
            | Command::Unsubscribe { channel, id }
            | Command::Presence { channel, id, .. }
            | Command::PresenceStats { channel, id }
            | Command::History { channel, id, .. } => {
                assert_eq!(object.get("channel").and_then(Value::as_str), Some(&**channel));
                *id
            }
            Command::Publish { channel, data, expect_seq, id } => {
                assert_eq!(object.get("channel").and_then(Value::as_str), Some(&**channel));
                check_data(&input, data, object.get("data"));
                let expected = object.get("expect_seq").and_then(Value::as_u64);
                assert_eq!(*expect_seq, expected, "expect_seq differs");
                *id
            }
            Command::Ping { id } => *id,
        };
        assert_eq!(object.get("id").and_then(Value::as_u64), id, "id differs");
    }

    if let Ok(body) = publish::parse(&input) {
        let Some(doc) = oracle(&input) else { return };
        let object = doc.as_object().expect("accepted body is not a JSON object");
        let expected: Vec<&serde_json::Map<String, Value>> = if body.batch {
            let list = object.get("messages").and_then(Value::as_array);
            let list = list.expect("batch without a messages array");
            list.iter()
                .map(|m| m.as_object().expect("batch element is not an object"))
                .collect()
        } else {
            vec![object]
        };
        assert_eq!(body.messages.len(), expected.len(), "messages lost or invented");
        for (message, expected) in body.messages.iter().zip(expected) {
            let channel = expected.get("channel").and_then(Value::as_str);
            assert_eq!(channel, Some(&*message.channel), "channel differs");
            check_data(&input, &message.data, expected.get("data"));
        }
    }
});

/// serde_json's reading of an input the server accepted. The server must not accept what is
/// not JSON; the one thing skipped is nesting deeper than serde_json's own recursion limit.
fn oracle(input: &[u8]) -> Option<Value> {
    match serde_json::from_slice(input) {
        Ok(doc) => Some(doc),
        Err(e) if e.to_string().contains("recursion limit") => None,
        Err(e) => panic!("accepted input that is not JSON ({e}): {:?}", String::from_utf8_lossy(input)),
    }
}

fn check_data(input: &Bytes, data: &Bytes, expected: Option<&Value>) {
    let start = input.as_ptr() as usize;
    let at = data.as_ptr() as usize;
    assert!(
        data.is_empty() || (at >= start && at + data.len() <= start + input.len()),
        "data is not a slice of the input"
    );
    let parsed: Value = match serde_json::from_slice(data) {
        Ok(value) => value,
        Err(e) if e.to_string().contains("recursion limit") => return,
        Err(e) => panic!("data {:?} is not JSON: {e}", String::from_utf8_lossy(data)),
    };
    assert_eq!(Some(&parsed), expected, "data differs from the document's data member");
}
