//! permessage-deflate: the offer parser and the bounded inflater on arbitrary input, and
//! the compressor against the inflater.
//!
//! Input layout: byte 0 picks the inflate limit and the compressor's window; the rest is
//! used three ways: as a `Sec-WebSocket-Extensions` value (when it is UTF-8), as a
//! compressed message from a client, and as a message to compress.
//!
//! Invariants:
//! - never panics;
//! - an accepted offer's response header, offered again, is accepted with the same
//!   parameters (what the server says it does is what it would accept);
//! - inflating never returns more than the limit, and fails only with 1007 (corrupt data)
//!   or 1009 (over the limit);
//! - whatever is compressed inflates back to itself, at every window, with and without
//!   context takeover, over two messages in a row.
#![no_main]

use herald::proto::deflate::{Compressor, CompressorSettings, Inflater, negotiate};
use herald::proto::frame::{FrameHeader, OpCode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [knobs, rest @ ..] = data else {
        return;
    };
    if let Ok(offers) = std::str::from_utf8(rest)
        && let Some(params) = negotiate(offers)
    {
        assert_eq!(negotiate(&params.response()), Some(params), "{offers:?}");
    }

    let limit = u64::from(knobs & 0x0F) * 1024 + 1;
    match Inflater::default().inflate(rest, limit) {
        Ok(message) => assert!(message.len() as u64 <= limit),
        Err(error) => assert!([1007, 1009].contains(&error.close_code()), "{error}"),
    }

    let window_bits = 9 + (knobs >> 4) % 7;
    let reset = knobs & 0x80 != 0;
    let settings = CompressorSettings {
        window_bits,
        ..CompressorSettings::PER_CONNECTION
    };
    let mut compressor = Compressor::new(settings, reset);
    let mut inflater = Inflater::default();
    for _ in 0..2 {
        let frame = compressor.encode_frame(OpCode::Binary, rest);
        let (header, len) = FrameHeader::parse(&frame).unwrap().unwrap();
        assert_eq!(header.rsv, 0b100);
        let inflated = inflater.inflate(&frame[len..], rest.len() as u64).unwrap();
        assert_eq!(&inflated[..], rest);
    }
});
