//! permessage-deflate (RFC 7692): choosing an offer from `Sec-WebSocket-Extensions` and the
//! response header for it, and compressing and inflating message payloads, with bounded
//! compressor memory and an inflated size that is checked while inflating.
//!
//! A compressed message is a raw DEFLATE stream flushed with `Z_SYNC_FLUSH`, minus the
//! `00 00 ff ff` that flush always ends with (§7.2.1); the receiver appends those four bytes
//! back before inflating (§7.2.2).

use bytes::{BufMut, Bytes, BytesMut};
use zlib_rs::{
    Deflate, DeflateConfig, DeflateFlush, Inflate, InflateFlush, Method, Status, Strategy,
};

use crate::proto::error::ProtocolError;
use crate::proto::frame::{FrameHeader, OpCode};

/// The extension token.
pub const EXTENSION: &str = "permessage-deflate";

/// What every sync flush ends with; stripped when sending, appended when receiving.
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The smallest LZ77 window zlib can produce in a raw stream: it turns 8 into 9, so an
/// offer that limits the server to 8 cannot be honoured and is declined.
pub const MIN_WINDOW_BITS: u8 = 9;

/// The largest window (32 KiB), what a peer may use unless it negotiated less.
pub const MAX_WINDOW_BITS: u8 = 15;

/// The parameters of the accepted offer (RFC 7692 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server resets its compressor after every message (§7.1.1.1).
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after every message (§7.1.1.2).
    pub client_no_context_takeover: bool,
    /// The largest window the server may compress with: the offer's
    /// `server_max_window_bits`, else 15 (§7.1.2.1).
    pub server_max_window_bits: u8,
    /// Whether the offer carried `server_max_window_bits`; the response must then repeat it.
    server_window_limited: bool,
}

impl DeflateParams {
    /// The value of the `Sec-WebSocket-Extensions` response header that accepts this offer.
    ///
    /// `client_max_window_bits` is never sent: this server inflates with a 32 KiB window, so
    /// whatever window the client uses is fine (§7.1.2.2 lets the server omit it).
    #[must_use]
    pub fn response(&self) -> String {
        let mut response = String::from(EXTENSION);
        if self.server_no_context_takeover {
            response.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            response.push_str("; client_no_context_takeover");
        }
        if self.server_window_limited {
            response.push_str("; server_max_window_bits=");
            response.push_str(&self.server_max_window_bits.to_string());
        }
        response
    }
}

/// Picks the first `permessage-deflate` offer in a `Sec-WebSocket-Extensions` value that
/// this server can honour exactly (RFC 7692 §5, §7.1); `None` declines them all, and the
/// connection goes ahead without compression.
///
/// An offer is declined when it has an unknown parameter, a parameter twice, a value where
/// none belongs, a window size that is not a plain number from 8 to 15, or asks the server
/// for a window of 8 (zlib's raw deflate cannot produce one). A header that does not parse
/// (an unterminated quoted string) declines everything.
#[must_use]
pub fn negotiate(offers: &str) -> Option<DeflateParams> {
    split_unquoted(offers, b',')?
        .into_iter()
        .find_map(accept_offer)
}

/// The parameters of one offer if it is a permessage-deflate offer this server can honour.
fn accept_offer(offer: &str) -> Option<DeflateParams> {
    let mut parts = split_unquoted(offer, b';')?.into_iter();
    if !parts.next()?.trim().eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let mut params = DeflateParams {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_max_window_bits: MAX_WINDOW_BITS,
        server_window_limited: false,
    };
    let mut client_window_seen = false;
    for part in parts {
        let (name, value) = match part.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquote(value.trim())?)),
            None => (part.trim(), None),
        };
        match (name.to_ascii_lowercase().as_str(), value) {
            ("server_no_context_takeover", None) if !params.server_no_context_takeover => {
                params.server_no_context_takeover = true;
            }
            ("client_no_context_takeover", None) if !params.client_no_context_takeover => {
                params.client_no_context_takeover = true;
            }
            ("server_max_window_bits", Some(value)) if !params.server_window_limited => {
                let bits = window_bits(value)?;
                if bits < MIN_WINDOW_BITS {
                    return None;
                }
                params.server_max_window_bits = bits;
                params.server_window_limited = true;
            }
            ("client_max_window_bits", value) if !client_window_seen => {
                if let Some(value) = value {
                    window_bits(value)?;
                }
                client_window_seen = true;
            }
            _ => return None,
        }
    }
    Some(params)
}

/// A window size as RFC 7692 §7.1.2 writes it: 8 to 15, digits only, no leading zero.
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// A parameter value without the quotes of a quoted-string (RFC 7230 §3.2.6); a quoted
/// value with a backslash escape is not a number and is refused as such later, so escapes
/// are left in place.
fn unquote(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(value),
    }
}

/// Splits at `separator` outside quoted strings; `None` on an unterminated quote.
fn split_unquoted(text: &str, separator: u8) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, byte) in text.bytes().enumerate() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            byte if byte == separator && !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return None;
    }
    parts.push(&text[start..]);
    Some(parts)
}

/// How a compressor is set up: its window, its hash table size and its level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressorSettings {
    /// log2 of the LZ77 window, 9 to 15.
    pub window_bits: u8,
    /// zlib's memLevel, 1 to 9: the hash table and literal buffer scale with it.
    pub mem_level: u8,
    /// zlib's level, 1 to 9.
    pub level: u8,
}

impl CompressorSettings {
    /// One compressor per shard for broadcasts: memory does not matter, ratio does.
    pub const SHARED: Self = Self {
        window_bits: MAX_WINDOW_BITS,
        mem_level: 8,
        level: 6,
    };

    /// A connection's own compressor. zlib-rs allocates two windows, a 2-byte chain entry
    /// per window byte, a fixed 128 KiB hash head and 7 bytes per literal-buffer entry
    /// (2^(memLevel+6) entries): about 370 KiB at zlib's defaults (15, 8), about 160 KiB
    /// here (12, 5). A 4 KiB window still spans several of the small JSON messages a push
    /// server sends.
    pub const PER_CONNECTION: Self = Self {
        window_bits: 12,
        mem_level: 5,
        level: 6,
    };

    /// These settings with the window cut to what the peer allows.
    #[must_use]
    pub fn within(self, max_window_bits: u8) -> Self {
        Self {
            window_bits: self.window_bits.min(max_window_bits),
            ..self
        }
    }
}

/// Compresses messages for one stream of frames (one connection, or every shared
/// broadcast): the state is allocated on the first message, not before, so idle connections
/// cost nothing.
pub struct Compressor {
    settings: CompressorSettings,
    /// Whether each message starts from an empty window (no context takeover), which is
    /// what lets a message be dropped from a queue without breaking the next ones.
    reset_each_message: bool,
    stream: Option<Box<Deflate>>,
    /// Output space reused between messages.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("settings", &self.settings)
            .field("reset_each_message", &self.reset_each_message)
            .field("allocated", &self.stream.is_some())
            .finish_non_exhaustive()
    }
}

/// Scratch space above this is given back after the message that needed it.
const SCRATCH_KEEP: usize = 64 * 1024;

impl Compressor {
    #[must_use]
    pub fn new(settings: CompressorSettings, reset_each_message: bool) -> Self {
        Self {
            settings: CompressorSettings {
                window_bits: settings.window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS),
                mem_level: settings.mem_level.clamp(1, 9),
                level: settings.level.clamp(1, 9),
            },
            reset_each_message,
            stream: None,
            scratch: Vec::new(),
        }
    }

    /// Whether the window carries over between messages, so every compressed message must
    /// reach the peer in order: none may be dropped or replaced once compressed.
    #[must_use]
    pub fn takes_over_context(&self) -> bool {
        !self.reset_each_message
    }

    /// A complete, final, unmasked server frame with RSV1 set holding `payload` compressed.
    #[must_use]
    pub fn encode_frame(&mut self, opcode: OpCode, payload: &[u8]) -> Bytes {
        let compressed = self.compress(payload);
        let header = FrameHeader {
            fin: true,
            rsv: 0b100,
            opcode,
            mask: None,
            payload_len: compressed.len() as u64,
        };
        let mut frame = BytesMut::with_capacity(header.encoded_len() + compressed.len());
        header.encode(&mut frame);
        frame.put_slice(compressed);
        if self.scratch.capacity() > SCRATCH_KEEP {
            self.scratch = Vec::new();
        }
        frame.freeze()
    }

    /// `payload` deflated and sync-flushed without the trailing `00 00 ff ff`.
    fn compress(&mut self, payload: &[u8]) -> &[u8] {
        let settings = self.settings;
        let stream = self.stream.get_or_insert_with(|| {
            Box::new(Deflate::new_with_config(DeflateConfig {
                level: i32::from(settings.level),
                method: Method::Deflated,
                window_bits: -i32::from(settings.window_bits),
                mem_level: i32::from(settings.mem_level),
                strategy: Strategy::Default,
            }))
        });
        let scratch = &mut self.scratch;
        scratch.clear();
        let (mut consumed, mut written) = (0, 0);
        loop {
            if written == scratch.len() {
                let more = (payload.len() - consumed) / 2 + 64;
                scratch.resize(written + more, 0);
            }
            let (in_before, out_before) = (stream.total_in(), stream.total_out());
            stream
                .compress(
                    &payload[consumed..],
                    &mut scratch[written..],
                    DeflateFlush::SyncFlush,
                )
                .expect("a deflate stream fed in order never errs");
            consumed += (stream.total_in() - in_before) as usize;
            written += (stream.total_out() - out_before) as usize;
            // zlib's contract: with all input given, output space left over means the
            // flush is complete.
            if consumed == payload.len() && written < scratch.len() {
                break;
            }
        }
        if scratch[..written].ends_with(&SYNC_TAIL) {
            written -= SYNC_TAIL.len();
        } else {
            // zlib flushes nothing for an empty message right after a flush; the peer
            // still needs a block to append the tail to: an empty stored block (§7.2.3.6).
            debug_assert_eq!(written, 0);
            scratch.clear();
            scratch.push(0x00);
            written = 1;
        }
        if self.reset_each_message {
            stream.reset();
        }
        &self.scratch[..written]
    }
}

/// Inflates a client's compressed messages; allocated on the first one.
#[derive(Default)]
pub struct Inflater {
    stream: Option<Box<Inflate>>,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("allocated", &self.stream.is_some())
            .finish()
    }
}

impl Inflater {
    /// Inflates one message's payload (all its frames' payloads together), refusing it as
    /// soon as the output passes `max` bytes, so a decompression bomb costs at most `max`
    /// (plus one byte) of memory.
    ///
    /// The window is always 32 KiB, so a client may use any window it likes; it is kept
    /// between messages, which is right whether or not the client takes over its context
    /// (a message compressed from an empty window never refers back).
    ///
    /// # Errors
    /// [`ProtocolError::MessageTooBig`] past `max`, [`ProtocolError::InvalidCompressedData`]
    /// when the data is not a DEFLATE stream.
    pub fn inflate(&mut self, compressed: &[u8], max: u64) -> Result<Bytes, ProtocolError> {
        let stream = self
            .stream
            .get_or_insert_with(|| Box::new(Inflate::new(false, MAX_WINDOW_BITS)));
        let limit = usize::try_from(max.min(1 << 40)).unwrap_or(usize::MAX / 2);
        let mut out = Vec::new();
        let mut written = 0;
        for (part, is_tail) in [(compressed, false), (&SYNC_TAIL[..], true)] {
            let mut input = part;
            loop {
                if written == out.len() {
                    if written > limit {
                        return Err(too_big(written, max));
                    }
                    let grown = (written * 2).max(compressed.len() * 4).max(1024);
                    out.resize(grown.min(limit + 1), 0);
                }
                let (in_before, out_before) = (stream.total_in(), stream.total_out());
                let status = stream.decompress(input, &mut out[written..], InflateFlush::SyncFlush);
                let consumed = (stream.total_in() - in_before) as usize;
                let produced = (stream.total_out() - out_before) as usize;
                input = &input[consumed..];
                written += produced;
                match status {
                    Err(_) => {
                        stream.reset(false);
                        return Err(ProtocolError::InvalidCompressedData);
                    }
                    Ok(Status::StreamEnd) => {
                        // The sender ended the stream (BFINAL): the next message starts a
                        // new one. Only our own tail may follow the end.
                        stream.reset(false);
                        if !is_tail && !input.is_empty() {
                            return Err(ProtocolError::InvalidCompressedData);
                        }
                        return finish(out, written, max);
                    }
                    Ok(Status::Ok | Status::BufError) => {
                        if input.is_empty() && written < out.len() {
                            break;
                        }
                        if consumed == 0 && produced == 0 && written < out.len() {
                            return Err(ProtocolError::InvalidCompressedData);
                        }
                    }
                }
            }
        }
        finish(out, written, max)
    }
}

fn finish(mut out: Vec<u8>, written: usize, max: u64) -> Result<Bytes, ProtocolError> {
    if written as u64 > max {
        return Err(too_big(written, max));
    }
    out.truncate(written);
    Ok(Bytes::from(out))
}

fn too_big(size: usize, max: u64) -> ProtocolError {
    ProtocolError::MessageTooBig {
        size: size as u64,
        max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(offers: &str) -> Option<String> {
        negotiate(offers).map(|p| p.response())
    }

    #[test]
    fn accepts_the_browser_offer() {
        assert_eq!(
            params("permessage-deflate; client_max_window_bits").as_deref(),
            Some("permessage-deflate")
        );
        let chosen = negotiate("permessage-deflate; client_max_window_bits").unwrap();
        assert_eq!(chosen.server_max_window_bits, 15);
        assert!(!chosen.server_no_context_takeover && !chosen.client_no_context_takeover);
    }

    #[test]
    fn echoes_every_parameter_it_honours() {
        assert_eq!(
            params(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=10; client_max_window_bits=12"
            )
            .as_deref(),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=10"
            )
        );
        assert_eq!(
            params("PerMessage-Deflate ;Server_Max_Window_Bits=\"9\"").as_deref(),
            Some("permessage-deflate; server_max_window_bits=9")
        );
    }

    /// Reliability catalogue Z-03.
    #[test]
    fn declines_offers_it_cannot_honour_exactly() {
        let declined = [
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=abc",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=1x",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; server_max_window_bits=10; server_max_window_bits=11",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; unknown_parameter",
            "permessage-deflate; \"unterminated",
            "x-webkit-deflate-frame",
            "permessage-deflate-x",
            "",
        ];
        for offer in declined {
            assert_eq!(negotiate(offer), None, "{offer}");
        }
        assert_eq!(
            params("permessage-deflate; client_max_window_bits=8").as_deref(),
            Some("permessage-deflate"),
            "the client may limit itself to 8: we inflate with any window"
        );
    }

    #[test]
    fn takes_the_first_offer_it_can_honour() {
        assert_eq!(
            params(
                "permessage-deflate; server_max_window_bits=8, \
                 permessage-deflate; server_max_window_bits=9; client_no_context_takeover, \
                 permessage-deflate"
            )
            .as_deref(),
            Some("permessage-deflate; client_no_context_takeover; server_max_window_bits=9")
        );
        assert_eq!(
            params("foo; bar=\"a,b\", permessage-deflate; bogus, permessage-deflate").as_deref(),
            Some("permessage-deflate")
        );
    }

    fn round_trip(compressor: &mut Compressor, inflater: &mut Inflater, message: &[u8]) {
        let frame = compressor.encode_frame(OpCode::Text, message);
        let (header, len) = FrameHeader::parse(&frame).unwrap().unwrap();
        assert_eq!(header.rsv, 0b100);
        assert!(header.fin);
        let inflated = inflater.inflate(&frame[len..], 1 << 24).unwrap();
        assert_eq!(&inflated[..], message);
    }

    fn json(i: usize) -> Vec<u8> {
        format!(
            r#"{{"type":"message","channel":"prices.btc","seq":{i},"data":{{"bid":{},"ask":{},"venue":"example","note":"{}"}}}}"#,
            i * 7,
            i * 7 + 1,
            "x".repeat(i % 300)
        )
        .into_bytes()
    }

    #[test]
    fn compressed_messages_inflate_to_the_original_at_every_window() {
        for window_bits in MIN_WINDOW_BITS..=MAX_WINDOW_BITS {
            for reset in [false, true] {
                let settings = CompressorSettings::PER_CONNECTION.within(window_bits);
                let mut compressor = Compressor::new(
                    CompressorSettings {
                        window_bits,
                        ..settings
                    },
                    reset,
                );
                let mut inflater = Inflater::default();
                for i in 0..50 {
                    round_trip(&mut compressor, &mut inflater, &json(i));
                }
                round_trip(&mut compressor, &mut inflater, b"");
                let big: Vec<u8> = (0..200_000u64).map(|i| (i * i % 251) as u8).collect();
                round_trip(&mut compressor, &mut inflater, &big);
            }
        }
    }

    #[test]
    fn context_takeover_makes_repeats_smaller_and_reset_does_not() {
        let message = json(42);
        let sizes = |reset| {
            let mut compressor = Compressor::new(CompressorSettings::SHARED, reset);
            let first = compressor.encode_frame(OpCode::Text, &message).len();
            let second = compressor.encode_frame(OpCode::Text, &message).len();
            (first, second)
        };
        let (first, second) = sizes(false);
        assert!(second < first / 2, "{first} then {second}");
        let (first, second) = sizes(true);
        assert_eq!(first, second);
        assert!(first < message.len());
    }

    #[test]
    fn a_message_from_an_empty_window_inflates_after_any_history() {
        // Shared broadcast frames are compressed without context and delivered to
        // connections whose inflater holds other messages' history. (A compressor that
        // takes over its context cannot be mixed with them: the peer's window would hold
        // messages that compressor never saw.)
        let mut shared = Compressor::new(CompressorSettings::SHARED, true);
        let mut own = Compressor::new(CompressorSettings::PER_CONNECTION, true);
        let mut inflater = Inflater::default();
        for i in 0..20 {
            let compressor = if i % 3 == 0 { &mut shared } else { &mut own };
            round_trip(compressor, &mut inflater, &json(i));
        }
    }

    /// Reliability catalogue: a decompression bomb is refused at the limit, with 1009.
    #[test]
    fn refuses_a_bomb_having_produced_at_most_the_limit() {
        let mut compressor = Compressor::new(CompressorSettings::SHARED, true);
        let zeros = vec![0u8; 16 << 20];
        let frame = compressor.encode_frame(OpCode::Binary, &zeros);
        let (_, len) = FrameHeader::parse(&frame).unwrap().unwrap();
        let bomb = &frame[len..];
        assert!(bomb.len() < 32 * 1024, "{}", bomb.len());
        let error = Inflater::default().inflate(bomb, 65_536).unwrap_err();
        assert_eq!(
            error,
            ProtocolError::MessageTooBig {
                size: 65_537,
                max: 65_536
            }
        );
        assert_eq!(error.close_code(), 1009);
        let exact = Inflater::default().inflate(bomb, 16 << 20).unwrap();
        assert_eq!(exact.len(), 16 << 20);
    }

    /// Reliability catalogue Z-02.
    #[test]
    fn corrupt_data_is_refused_with_1007() {
        let mut compressor = Compressor::new(CompressorSettings::SHARED, true);
        let frame = compressor.encode_frame(OpCode::Text, &json(7));
        let (_, len) = FrameHeader::parse(&frame).unwrap().unwrap();
        let good = frame[len..].to_vec();
        let mut refused = 0;
        for bit in 0..good.len() * 8 {
            let mut flipped = good.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            // A flipped bit in a literal can still be a valid stream: the UTF-8 check of
            // text (the decoder's job) is the next line of defence.
            if let Err(error) = Inflater::default().inflate(&flipped, 1 << 20) {
                assert_eq!(error, ProtocolError::InvalidCompressedData);
                assert_eq!(error.close_code(), 1007);
                refused += 1;
            }
        }
        assert!(refused > 0);
        let reserved_block_type = [0x07, 0x00];
        assert_eq!(
            Inflater::default().inflate(&reserved_block_type, 1 << 20),
            Err(ProtocolError::InvalidCompressedData)
        );
    }

    #[test]
    fn a_final_block_ends_the_stream_and_the_next_message_starts_afresh() {
        // A raw stream with BFINAL set: a fixed-Huffman block holding "a", then the end.
        let mut deflate = Deflate::new(6, false, 15);
        let mut out = vec![0; 64];
        deflate
            .compress(b"a", &mut out, DeflateFlush::Finish)
            .unwrap();
        let len = deflate.total_out() as usize;
        let mut inflater = Inflater::default();
        assert_eq!(&inflater.inflate(&out[..len], 100).unwrap()[..], b"a");
        assert_eq!(&inflater.inflate(&out[..len], 100).unwrap()[..], b"a");
        let mut trailing = out[..len].to_vec();
        trailing.push(0);
        assert_eq!(
            inflater.inflate(&trailing, 100),
            Err(ProtocolError::InvalidCompressedData)
        );
    }

    #[test]
    fn compressor_state_is_allocated_on_first_use() {
        let mut compressor = Compressor::new(CompressorSettings::PER_CONNECTION, false);
        assert!(compressor.stream.is_none());
        let _ = compressor.encode_frame(OpCode::Text, b"hello");
        assert!(compressor.stream.is_some());
        assert!(Inflater::default().stream.is_none());
    }
}
