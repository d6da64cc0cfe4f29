//! `proto::Connection` (decoder + close handshake) fed a client byte stream in chunks.
//!
//! Input layout: byte 0 picks the chunking, byte 1 the limits, the rest is the stream.
//!
//! Invariants:
//! - never panics;
//! - every delivered message is at most `max_message_bytes`, text is UTF-8;
//! - `Closed`/`Failed` is the last event: once closed nothing more is delivered or sent,
//!   whatever bytes follow;
//! - a failure queues one close frame whose code is 1002, 1007 or 1009 and matches the
//!   error; a client close is echoed with its code; everything sent is a well-formed
//!   unmasked final server frame (pongs, then at most one close);
//! - the stream delivered whole, byte by byte and in the chosen chunks gives the same
//!   events and the same frames to send.
#![no_main]

use bytes::{Bytes, BytesMut};
use herald::proto::frame::{FrameHeader, OpCode};
use herald::proto::{Connection, DecoderLimits, Event};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<Event>,
    sent: Vec<Bytes>,
}

fuzz_target!(|data: &[u8]| {
    let [chunking, limits, stream @ ..] = data else {
        return;
    };
    let limits = pick_limits(*limits);

    let whole = drive(stream, limits, &mut std::iter::repeat(usize::MAX));
    check(&whole, limits);
    let bytewise = drive(stream, limits, &mut std::iter::repeat(1));
    assert_eq!(whole, bytewise, "whole and byte-by-byte delivery differ");
    let chunked = drive(stream, limits, &mut chunk_sizes(*chunking));
    assert_eq!(whole, chunked, "whole and chunked ({chunking}) delivery differ");
});

/// Small limits half the time, so that the 1009 paths are reached with small inputs.
fn pick_limits(byte: u8) -> DecoderLimits {
    if byte & 1 == 0 {
        DecoderLimits::default()
    } else {
        let frame = u64::from(byte >> 1) * 4;
        DecoderLimits {
            max_frame_bytes: frame,
            max_message_bytes: frame + u64::from(byte & 0x0E) * 8,
            max_fragments: 1024,
        }
    }
}

/// 0: one chunk; 1..=64: that fixed size; above: pseudo-random sizes 1..=16.
fn chunk_sizes(seed: u8) -> impl Iterator<Item = usize> {
    let mut state = u32::from(seed).wrapping_mul(0x9E37_79B9) | 1;
    std::iter::repeat_with(move || match seed {
        0 => usize::MAX,
        1..=64 => usize::from(seed),
        _ => {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state % 16) as usize + 1
        }
    })
}

/// Feeds `stream` the way a shard does: append a read, poll events until `None`, then drain
/// the frames to send. Checks the "closed means closed" rule on the way.
fn drive(
    stream: &[u8],
    limits: DecoderLimits,
    sizes: &mut dyn Iterator<Item = usize>,
) -> Outcome {
    let mut conn = Connection::new(limits);
    let mut buf = BytesMut::new();
    let mut outcome = Outcome {
        events: Vec::new(),
        sent: Vec::new(),
    };
    let mut closed_at: Option<(usize, usize)> = None;
    let mut rest = stream;
    while !rest.is_empty() {
        let size = sizes.next().unwrap_or(usize::MAX).min(rest.len());
        let (read, after) = rest.split_at(size);
        rest = after;
        buf.extend_from_slice(read);
        while let Some(event) = conn.poll_event(&mut buf) {
            outcome.events.push(event);
        }
        while let Some(frame) = conn.poll_transmit() {
            outcome.sent.push(frame);
        }
        match closed_at {
            Some(at) => assert_eq!(
                at,
                (outcome.events.len(), outcome.sent.len()),
                "events or frames after the connection closed"
            ),
            None if conn.is_closed() => {
                closed_at = Some((outcome.events.len(), outcome.sent.len()));
            }
            None => {}
        }
    }
    if conn.is_closed() {
        // More bytes after the end change nothing either.
        buf.extend_from_slice(b"\x81\x80\0\0\0\0\x89\x80\0\0\0\0");
        assert!(conn.poll_event(&mut buf).is_none(), "event after close");
        assert!(conn.poll_transmit().is_none(), "frame after close");
    }
    outcome
}

fn check(outcome: &Outcome, limits: DecoderLimits) {
    let mut expected_sends = Vec::new();
    for (i, event) in outcome.events.iter().enumerate() {
        let last = i + 1 == outcome.events.len();
        match event {
            Event::Message { text, payload } => {
                assert!(
                    payload.len() as u64 <= limits.max_message_bytes,
                    "message of {} bytes delivered with limit {}",
                    payload.len(),
                    limits.max_message_bytes
                );
                if *text {
                    assert!(std::str::from_utf8(payload).is_ok(), "text is not UTF-8");
                }
            }
            Event::Closed { code } => {
                assert!(last, "event after Closed");
                expected_sends.push(*code);
            }
            Event::Failed(error) => {
                assert!(last, "event after Failed");
                let code = error.close_code();
                assert!([1002, 1007, 1009].contains(&code), "close code {code}");
                expected_sends.push(Some(code));
            }
        }
    }

    // Everything sent: pongs (any number, first), then at most one close, last.
    let mut closes = Vec::new();
    for (i, frame) in outcome.sent.iter().enumerate() {
        let Ok(Some((header, len))) = FrameHeader::parse(frame) else {
            panic!("sent bytes are not a frame: {frame:?}");
        };
        assert!(header.fin && header.rsv == 0 && header.mask.is_none(), "{header:?}");
        assert_eq!(header.payload_len as usize, frame.len() - len, "length mismatch");
        let payload = &frame[len..];
        match header.opcode {
            OpCode::Pong => assert!(closes.is_empty(), "pong after close"),
            OpCode::Close => {
                assert_eq!(i + 1, outcome.sent.len(), "frame after our close");
                let code = match payload {
                    [] => None,
                    [h, l, reason @ ..] => {
                        assert!(std::str::from_utf8(reason).is_ok());
                        Some(u16::from_be_bytes([*h, *l]))
                    }
                    [_] => panic!("1-byte close payload"),
                };
                closes.push(code);
            }
            other => panic!("server sent a {other:?} frame"),
        }
    }
    assert_eq!(closes, expected_sends, "close sent does not match the events");
}
