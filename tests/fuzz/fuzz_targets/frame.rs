//! `proto::frame::FrameHeader::parse` on arbitrary bytes.
//!
//! Invariants:
//! - never panics; the consumed length is at most the input and equals `encoded_len`;
//! - parse only accepts minimal lengths, so every parsed header re-encodes (`encode`) to
//!   exactly the bytes it was parsed from, and an independent decoding of those bytes
//!   (written out below from RFC 6455 §5.2) gives the same fields;
//! - control frames are final and at most 125 bytes, 64-bit lengths have the top bit clear;
//! - parsing is incremental: every shorter prefix of an accepted header says "need more",
//!   and every prefix gives either "need more" or the whole input's answer.
#![no_main]

use bytes::BytesMut;
use herald::proto::frame::{FrameHeader, OpCode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = FrameHeader::parse(data);
    if let Ok(Some((header, len))) = &whole {
        let (header, len) = (*header, *len);
        assert!(len <= data.len(), "consumed {len} of {} bytes", data.len());
        assert!((2..=14).contains(&len));
        assert_eq!(len, header.encoded_len());

        let mut encoded = BytesMut::new();
        header.encode(&mut encoded);
        assert_eq!(&encoded[..], &data[..len], "re-encoding differs for {header:?}");

        assert_eq!(header, reference_decode(&data[..len]), "fields differ");
        if header.opcode.is_control() {
            assert!(header.fin && header.payload_len <= 125, "bad control frame {header:?}");
        }
        assert_eq!(header.payload_len >> 63, 0);
        for short in 0..len {
            assert_eq!(FrameHeader::parse(&data[..short]), Ok(None), "prefix {short}");
        }
    }
    for cut in 0..data.len().min(16) {
        match FrameHeader::parse(&data[..cut]) {
            Ok(None) => {}
            prefix => assert_eq!(prefix, whole, "prefix {cut} answered differently"),
        }
    }
});

/// RFC 6455 §5.2 base framing, decoded without the server's code (`bytes` is a whole,
/// minimal header).
fn reference_decode(bytes: &[u8]) -> FrameHeader {
    let opcode = match bytes[0] & 0x0F {
        0x0 => OpCode::Continuation,
        0x1 => OpCode::Text,
        0x2 => OpCode::Binary,
        0x8 => OpCode::Close,
        0x9 => OpCode::Ping,
        0xA => OpCode::Pong,
        other => panic!("accepted reserved opcode {other:#x}"),
    };
    let (payload_len, mut at) = match bytes[1] & 0x7F {
        126 => (u64::from(bytes[2]) << 8 | u64::from(bytes[3]), 4),
        127 => (
            bytes[2..10].iter().fold(0u64, |n, &b| n << 8 | u64::from(b)),
            10,
        ),
        n => (u64::from(n), 2),
    };
    let mask = (bytes[1] & 0x80 != 0).then(|| {
        let key = [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
        at += 4;
        key
    });
    assert_eq!(at, bytes.len());
    FrameHeader {
        fin: bytes[0] & 0x80 != 0,
        rsv: (bytes[0] >> 4) & 0x07,
        opcode,
        mask,
        payload_len,
    }
}
