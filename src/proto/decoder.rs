//! Message assembly from client frames (RFC 6455 §5.4-§5.6): unmasking in place, fragments,
//! interleaved control frames, UTF-8 and size limits, and inflating permessage-deflate
//! messages (RFC 7692) when it was negotiated.

use std::sync::Arc;

use bytes::{Buf as _, Bytes, BytesMut};

use crate::proto::close::{CloseFrame, parse_close_payload};
use crate::proto::deflate::Inflater;
use crate::proto::error::ProtocolError;
use crate::proto::frame::{FrameHeader, OpCode};
use crate::proto::mask::apply_mask;
use crate::proto::utf8::Utf8Validator;

/// Size limits on what a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderLimits {
    /// Largest payload of a single frame, in bytes.
    pub max_frame_bytes: u64,
    /// Largest message (all fragments together), in bytes.
    pub max_message_bytes: u64,
    /// Most frames one message may arrive in (a flood of empty fragments costs the
    /// server work without growing the message).
    pub max_fragments: u32,
}

impl Default for DecoderLimits {
    /// 1 MiB frames and messages: ample for a push server's client commands.
    fn default() -> Self {
        Self {
            max_frame_bytes: 1 << 20,
            max_message_bytes: 1 << 20,
            max_fragments: 1024,
        }
    }
}

/// A complete message or control frame from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message; the payload is valid UTF-8.
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping; the caller owes a pong with the same payload (§5.5.2).
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// A close frame, with its code and reason if it had any; the caller owes a close in
    /// return if it has not sent one (§5.5.1).
    Close(Option<CloseFrame>),
}

/// Turns a client's byte stream into [`Message`]s.
///
/// Holds the header of the frame being received with how much of its payload is already
/// unmasked, and the fragmented message being assembled. Unfragmented messages and control
/// frames are handed out as slices of the read buffer, without a copy; the payload of a
/// fragmented message is copied once, into its own buffer, so that a message of many small
/// fragments holds at most `max_message_bytes` and not the read buffers it arrived in.
///
/// With permessage-deflate negotiated ([`Decoder::with_inflater`]), a message whose first
/// frame has RSV1 set is assembled compressed and inflated once complete; the inflated size
/// counts against `max_message_bytes` while inflating, and text is UTF-8-checked after it.
///
/// After an error the stream is unusable (the connection is failed) and the decoder must
/// be dropped.
#[derive(Debug)]
pub struct Decoder {
    /// Shared by the connections of one endpoint: a pointer in each instead of 24 bytes.
    limits: Arc<DecoderLimits>,
    /// The frame whose header has been consumed from the buffer but whose payload has not.
    frame: Option<PartialFrame>,
    /// The fragmented message in progress, between its first and its final frame (rare:
    /// behind a pointer, so an idle connection does not carry its room).
    message: Option<Box<PartialMessage>>,
    utf8: Utf8Validator,
    /// Present when permessage-deflate was negotiated: RSV1 is then allowed.
    inflating: Option<Box<Inflating>>,
}

/// The receive side of permessage-deflate.
#[derive(Debug)]
struct Inflating {
    inflater: Inflater,
    /// Compressed messages inflated so far.
    messages: u64,
}

/// A frame past its header: what of the header is still needed, and how far its payload
/// got (every connection holds one while a frame is split across reads, so it is kept
/// to 32 bytes).
#[derive(Debug, Clone, Copy)]
struct PartialFrame {
    fin: bool,
    /// RSV1-RSV3 as in [`FrameHeader::rsv`].
    rsv: u8,
    opcode: OpCode,
    /// The payload length as a `usize`, checked against the limits.
    len: usize,
    /// The key; every accepted client frame has one.
    mask: [u8; 4],
    /// How many payload bytes at the front of the buffer are already unmasked (and, for
    /// text, validated).
    unmasked: usize,
    /// Whether the payload belongs to a text message and must be UTF-8.
    text: bool,
    /// Whether it belongs to a compressed message (checked for UTF-8 once inflated).
    compressed: bool,
}

#[derive(Debug)]
struct PartialMessage {
    text: bool,
    compressed: bool,
    payload: BytesMut,
    /// Frames received so far.
    fragments: u32,
}

impl Decoder {
    /// A decoder at the start of the stream.
    #[must_use]
    pub fn new(limits: impl Into<Arc<DecoderLimits>>) -> Self {
        Self {
            limits: limits.into(),
            frame: None,
            message: None,
            utf8: Utf8Validator::new(),
            inflating: None,
        }
    }

    /// A decoder for a connection that negotiated permessage-deflate.
    #[must_use]
    pub fn with_inflater(limits: impl Into<Arc<DecoderLimits>>, inflater: Inflater) -> Self {
        Self {
            inflating: Some(Box::new(Inflating {
                inflater,
                messages: 0,
            })),
            ..Self::new(limits)
        }
    }

    /// How many compressed messages this decoder has inflated.
    #[must_use]
    pub fn inflated_messages(&self) -> u64 {
        self.inflating.as_ref().map_or(0, |i| i.messages)
    }

    /// Decodes the next message from `buf`, the connection's read buffer.
    ///
    /// Consumes frame headers and complete payloads from the front of `buf`, and unmasks an
    /// incomplete payload in place where it lies (it stays in `buf`, counted as unmasked, so
    /// the caller must only append to `buf` between calls). Returns `Ok(None)` when `buf`
    /// holds no further complete message; call again after the next read.
    ///
    /// Fails as soon as a rule is broken: a too-large frame on its header, invalid UTF-8 on
    /// the first byte that cannot be completed.
    ///
    /// # Errors
    /// Any [`ProtocolError`]; the connection must then be failed with its close code.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        loop {
            let frame = match &mut self.frame {
                Some(frame) => frame,
                None => {
                    let Some((header, header_len)) = FrameHeader::parse(buf)? else {
                        return Ok(None);
                    };
                    let frame = self.start_frame(header)?;
                    buf.advance(header_len);
                    self.frame.insert(frame)
                }
            };

            let available = buf.len().min(frame.len);
            if available > frame.unmasked {
                let fresh = &mut buf[frame.unmasked..available];
                apply_mask(fresh, frame.mask, frame.unmasked);
                if frame.text && !frame.compressed {
                    self.utf8.feed(fresh)?;
                }
                frame.unmasked = available;
            }
            if available < frame.len {
                return Ok(None);
            }

            let frame = *frame;
            self.frame = None;
            if let Some(message) = self.finish_frame(frame, buf)? {
                return Ok(Some(message));
            }
        }
    }

    /// Checks a new frame's header against the state and the limits.
    fn start_frame(&self, header: FrameHeader) -> Result<PartialFrame, ProtocolError> {
        // RSV1 marks a compressed message, on its first frame only (RFC 7692 §6.1).
        let rsv1 = header.rsv == 0b100
            && self.inflating.is_some()
            && matches!(header.opcode, OpCode::Text | OpCode::Binary);
        if header.rsv != 0 && !rsv1 {
            return Err(ProtocolError::ReservedBitsSet);
        }
        let mask = header.mask.ok_or(ProtocolError::UnmaskedFrame)?;
        let (text, compressed) = match (header.opcode, &self.message) {
            (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Continuation, Some(message)) => (message.text, message.compressed),
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(ProtocolError::ExpectedContinuation);
            }
            (opcode, _) => (opcode == OpCode::Text, rsv1),
        };
        let too_big = |size, max| ProtocolError::MessageTooBig { size, max };
        if header.payload_len > self.limits.max_frame_bytes {
            return Err(too_big(header.payload_len, self.limits.max_frame_bytes));
        }
        if let Some(message) = &self.message
            && header.opcode == OpCode::Continuation
            && message.fragments >= self.limits.max_fragments
        {
            return Err(ProtocolError::TooManyFragments {
                max: self.limits.max_fragments,
            });
        }
        if !header.opcode.is_control() {
            let so_far = self
                .message
                .as_ref()
                .map_or(0, |message| message.payload.len() as u64);
            let total = so_far.saturating_add(header.payload_len);
            if total > self.limits.max_message_bytes {
                return Err(too_big(total, self.limits.max_message_bytes));
            }
        }
        let len = usize::try_from(header.payload_len)
            .map_err(|_| too_big(header.payload_len, usize::MAX as u64))?;
        Ok(PartialFrame {
            fin: header.fin,
            rsv: header.rsv,
            opcode: header.opcode,
            len,
            mask,
            unmasked: 0,
            text,
            compressed,
        })
    }

    /// Takes the complete, unmasked payload of `frame` off `buf` and returns the message it
    /// completes, if any.
    fn finish_frame(
        &mut self,
        frame: PartialFrame,
        buf: &mut BytesMut,
    ) -> Result<Option<Message>, ProtocolError> {
        let len = frame.len;
        let message = match frame.opcode {
            OpCode::Ping => Message::Ping(buf.split_to(len).freeze()),
            OpCode::Pong => Message::Pong(buf.split_to(len).freeze()),
            OpCode::Close => {
                let payload = buf.split_to(len).freeze();
                let close = parse_close_payload(&payload)?.map(|(code, _)| CloseFrame {
                    code,
                    reason: payload.slice(2..),
                });
                Message::Close(close)
            }
            OpCode::Text | OpCode::Binary if frame.fin => {
                let payload = buf.split_to(len).freeze();
                let compressed = frame.rsv != 0;
                self.complete(frame.opcode == OpCode::Text, compressed, payload)?
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                // A fragment: append it to the message being assembled.
                let mut message = self.message.take().unwrap_or_else(|| {
                    Box::new(PartialMessage {
                        text: frame.opcode == OpCode::Text,
                        compressed: frame.rsv != 0,
                        payload: BytesMut::with_capacity(len),
                        fragments: 0,
                    })
                });
                message.fragments += 1;
                message.payload.extend_from_slice(&buf[..len]);
                buf.advance(len);
                if !frame.fin {
                    self.message = Some(message);
                    return Ok(None);
                }
                self.complete(message.text, message.compressed, message.payload.freeze())?
            }
        };
        Ok(Some(message))
    }

    /// A whole data message, inflated if it was compressed; text must be valid UTF-8 and end
    /// on a code point boundary.
    fn complete(
        &mut self,
        text: bool,
        compressed: bool,
        payload: Bytes,
    ) -> Result<Message, ProtocolError> {
        let payload = match &mut self.inflating {
            Some(inflating) if compressed => {
                let inflated = inflating
                    .inflater
                    .inflate(&payload, self.limits.max_message_bytes)?;
                inflating.messages += 1;
                if text {
                    self.utf8.feed(&inflated)?;
                }
                inflated
            }
            _ => payload,
        };
        if !text {
            return Ok(Message::Binary(payload));
        }
        self.utf8.finish()?;
        Ok(Message::Text(payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::encode_client_frame;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        encode_client_frame(opcode, fin, payload, MASK)
    }

    fn decode_all(bytes: &[u8], limits: DecoderLimits) -> Result<Vec<Message>, ProtocolError> {
        let mut decoder = Decoder::new(limits);
        let mut buf = BytesMut::from(bytes);
        let mut messages = Vec::new();
        while let Some(message) = decoder.decode(&mut buf)? {
            messages.push(message);
        }
        assert!(buf.is_empty(), "whole frames are consumed");
        Ok(messages)
    }

    fn decode_bytewise(bytes: &[u8], limits: DecoderLimits) -> Result<Vec<Message>, ProtocolError> {
        let mut decoder = Decoder::new(limits);
        let mut buf = BytesMut::new();
        let mut messages = Vec::new();
        for &byte in bytes {
            buf.extend_from_slice(&[byte]);
            while let Some(message) = decoder.decode(&mut buf)? {
                messages.push(message);
            }
        }
        Ok(messages)
    }

    fn text(payload: &str) -> Message {
        Message::Text(Bytes::copy_from_slice(payload.as_bytes()))
    }

    #[test]
    fn decodes_rfc_masked_hello() {
        let bytes = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let messages = decode_all(&bytes, DecoderLimits::default()).unwrap();
        assert_eq!(messages, [text("Hello")]);
    }

    #[test]
    fn unfragmented_payload_is_a_slice_of_the_read_buffer() {
        let mut buf = BytesMut::from(&frame(OpCode::Binary, true, &[9; 100])[..]);
        let start = buf.as_ptr() as usize;
        let Some(Message::Binary(payload)) = Decoder::new(DecoderLimits::default())
            .decode(&mut buf)
            .unwrap()
        else {
            panic!("expected a binary message");
        };
        assert_eq!(payload.as_ptr() as usize, start + 6);
        assert_eq!(&payload[..], &[9; 100]);
    }

    #[test]
    fn assembles_fragments_with_interleaved_control_frames() {
        let mut bytes = frame(OpCode::Text, false, b"Hel");
        bytes.extend(frame(OpCode::Ping, true, b"p"));
        bytes.extend(frame(OpCode::Continuation, false, b""));
        bytes.extend(frame(OpCode::Pong, true, b""));
        bytes.extend(frame(OpCode::Continuation, true, b"lo"));
        let expected = [
            Message::Ping(Bytes::from_static(b"p")),
            Message::Pong(Bytes::new()),
            text("Hello"),
        ];
        assert_eq!(
            decode_all(&bytes, DecoderLimits::default()).unwrap(),
            expected
        );
        assert_eq!(
            decode_bytewise(&bytes, DecoderLimits::default()).unwrap(),
            expected
        );
    }

    #[test]
    fn refuses_more_fragments_than_the_limit_with_1009() {
        let mut decoder = Decoder::new(DecoderLimits {
            max_fragments: 3,
            ..DecoderLimits::default()
        });
        let mut bytes = frame(OpCode::Text, false, b"a");
        bytes.extend(frame(OpCode::Continuation, false, b""));
        bytes.extend(frame(OpCode::Continuation, false, b""));
        bytes.extend(frame(OpCode::Continuation, true, b""));
        let mut buf = BytesMut::from(&bytes[..]);
        let err = loop {
            match decoder.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the fourth frame must be refused"),
                Err(e) => break e,
            }
        };
        assert_eq!(err, ProtocolError::TooManyFragments { max: 3 });
        assert_eq!(err.close_code(), 1009);
    }

    /// Autobahn 9.3.1 sends one message in 65,536 frames; a raised limit allows it.
    #[test]
    fn accepts_many_fragments_up_to_the_limit() {
        let mut bytes = frame(OpCode::Binary, false, b"a");
        for _ in 0..65_534 {
            bytes.extend(frame(OpCode::Continuation, false, b"a"));
        }
        bytes.extend(frame(OpCode::Continuation, true, b"a"));
        let limits = DecoderLimits {
            max_fragments: 65_536,
            ..DecoderLimits::default()
        };
        let messages = decode_all(&bytes, limits).unwrap();
        assert_eq!(messages, [Message::Binary(Bytes::from(vec![b'a'; 65_536]))]);
    }

    #[test]
    fn validates_utf8_across_fragment_boundaries() {
        let euro = "\u{20ac}".as_bytes();
        let mut bytes = frame(OpCode::Text, false, &euro[..1]);
        bytes.extend(frame(OpCode::Continuation, false, &euro[1..2]));
        bytes.extend(frame(OpCode::Continuation, true, &euro[2..]));
        assert_eq!(
            decode_all(&bytes, DecoderLimits::default()).unwrap(),
            [text("\u{20ac}")]
        );

        let mut bytes = frame(OpCode::Text, false, &euro[..2]);
        bytes.extend(frame(OpCode::Continuation, true, b""));
        assert_eq!(
            decode_all(&bytes, DecoderLimits::default()),
            Err(ProtocolError::InvalidUtf8)
        );
    }

    #[test]
    fn does_not_validate_binary_as_utf8() {
        let bytes = frame(OpCode::Binary, true, b"\xff\xfe");
        assert!(decode_all(&bytes, DecoderLimits::default()).is_ok());
    }

    #[test]
    fn fails_fast_on_invalid_utf8_before_the_frame_is_complete() {
        let mut payload = "\u{3ba}\u{1f79}\u{3c3}\u{3bc}\u{3b5}".as_bytes().to_vec();
        payload.extend_from_slice(b"\xf4\x90\x80\x80");
        payload.extend_from_slice(&[b'a'; 50]);
        let bytes = frame(OpCode::Text, true, &payload);
        let invalid_at = 6 + 11 + 1; // header, 11 valid bytes, the F4 lead byte
        let mut decoder = Decoder::new(DecoderLimits::default());
        let mut buf = BytesMut::from(&bytes[..invalid_at]);
        assert_eq!(decoder.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&bytes[invalid_at..=invalid_at]);
        assert_eq!(decoder.decode(&mut buf), Err(ProtocolError::InvalidUtf8));
    }

    #[test]
    fn rejects_unmasked_client_frame() {
        assert_eq!(
            decode_all(
                &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f],
                DecoderLimits::default()
            ),
            Err(ProtocolError::UnmaskedFrame)
        );
    }

    #[test]
    fn rejects_reserved_bits() {
        let mut bytes = frame(OpCode::Text, true, b"x");
        bytes[0] |= 0x40;
        assert_eq!(
            decode_all(&bytes, DecoderLimits::default()),
            Err(ProtocolError::ReservedBitsSet)
        );
    }

    #[test]
    fn rejects_continuation_without_a_message() {
        let bytes = frame(OpCode::Continuation, true, b"x");
        assert_eq!(
            decode_all(&bytes, DecoderLimits::default()),
            Err(ProtocolError::UnexpectedContinuation)
        );
    }

    #[test]
    fn rejects_new_message_inside_a_fragmented_one() {
        let mut bytes = frame(OpCode::Binary, false, b"x");
        bytes.extend(frame(OpCode::Text, true, b"y"));
        assert_eq!(
            decode_all(&bytes, DecoderLimits::default()),
            Err(ProtocolError::ExpectedContinuation)
        );
    }

    #[test]
    fn rejects_too_big_frame_on_its_header() {
        let limits = DecoderLimits {
            max_frame_bytes: 100,
            max_message_bytes: 1000,
            max_fragments: 1024,
        };
        let bytes = frame(OpCode::Binary, true, &[0; 101]);
        let mut decoder = Decoder::new(limits);
        let mut buf = BytesMut::from(&bytes[..8]);
        assert_eq!(
            decoder.decode(&mut buf),
            Err(ProtocolError::MessageTooBig {
                size: 101,
                max: 100
            })
        );
    }

    #[test]
    fn rejects_too_big_message_on_the_fragment_that_crosses_the_limit() {
        let limits = DecoderLimits {
            max_frame_bytes: 100,
            max_message_bytes: 150,
            max_fragments: 1024,
        };
        let mut bytes = frame(OpCode::Binary, false, &[0; 100]);
        bytes.extend(frame(OpCode::Continuation, true, &[0; 51]));
        assert_eq!(
            decode_all(&bytes, limits),
            Err(ProtocolError::MessageTooBig {
                size: 151,
                max: 150
            })
        );
    }

    #[test]
    fn decodes_close_with_and_without_code() {
        let mut bytes = frame(OpCode::Close, true, b"\x03\xe8bye");
        bytes.extend(frame(OpCode::Close, true, b""));
        let messages = decode_all(&bytes, DecoderLimits::default()).unwrap();
        assert_eq!(
            messages,
            [
                Message::Close(Some(CloseFrame {
                    code: 1000,
                    reason: Bytes::from_static(b"bye")
                })),
                Message::Close(None),
            ]
        );
    }

    #[test]
    fn rejects_invalid_close_payloads() {
        for (payload, error) in [
            (&b"\x03"[..], ProtocolError::InvalidClosePayload),
            (b"\x03\xed", ProtocolError::InvalidCloseCode(1005)),
            (b"\x03\xe8\xff", ProtocolError::InvalidUtf8),
        ] {
            let bytes = frame(OpCode::Close, true, payload);
            assert_eq!(decode_all(&bytes, DecoderLimits::default()), Err(error));
        }
    }

    #[test]
    fn bytewise_and_whole_delivery_agree() {
        let mut bytes = frame(OpCode::Text, true, "caf\u{e9}".as_bytes());
        bytes.extend(frame(OpCode::Binary, true, &[1; 300]));
        bytes.extend(frame(OpCode::Binary, false, &[2; 70_000]));
        bytes.extend(frame(OpCode::Ping, true, b"ping"));
        bytes.extend(frame(OpCode::Continuation, true, &[3; 10]));
        let whole = decode_all(&bytes, DecoderLimits::default()).unwrap();
        assert_eq!(whole.len(), 4);
        assert_eq!(
            decode_bytewise(&bytes, DecoderLimits::default()).unwrap(),
            whole
        );
    }

    /// A masked client frame with `rsv` set.
    fn frame_rsv(opcode: OpCode, fin: bool, rsv: u8, payload: &[u8]) -> Vec<u8> {
        let mut bytes = frame(opcode, fin, payload);
        bytes[0] |= rsv << 4;
        bytes
    }

    /// `message` deflated as a client sends it: raw, sync-flushed, tail removed.
    fn deflated(message: &[u8]) -> Vec<u8> {
        use crate::proto::deflate::{Compressor, CompressorSettings};
        let frame =
            Compressor::new(CompressorSettings::SHARED, true).encode_frame(OpCode::Binary, message);
        let (_, len) = FrameHeader::parse(&frame).unwrap().unwrap();
        frame[len..].to_vec()
    }

    fn decode_compressed(
        bytes: &[u8],
        limits: DecoderLimits,
    ) -> Result<Vec<Message>, ProtocolError> {
        let mut decoder = Decoder::with_inflater(limits, Inflater::default());
        let mut buf = BytesMut::from(bytes);
        let mut messages = Vec::new();
        while let Some(message) = decoder.decode(&mut buf)? {
            messages.push(message);
        }
        Ok(messages)
    }

    #[test]
    fn refuses_rsv1_unless_deflate_was_negotiated() {
        let bytes = frame_rsv(OpCode::Text, true, 0b100, &deflated(b"hello"));
        assert_eq!(
            decode_all(&bytes, DecoderLimits::default()),
            Err(ProtocolError::ReservedBitsSet)
        );
        assert_eq!(
            decode_compressed(&bytes, DecoderLimits::default()).unwrap(),
            [text("hello")]
        );
    }

    #[test]
    fn refuses_rsv1_on_continuations_and_control_frames_and_rsv2_rsv3_always() {
        let mut continued = frame_rsv(OpCode::Text, false, 0b100, b"");
        continued.extend(frame_rsv(OpCode::Continuation, true, 0b100, b""));
        let cases = [
            continued,
            frame_rsv(OpCode::Ping, true, 0b100, b""),
            frame_rsv(OpCode::Close, true, 0b100, b""),
            frame_rsv(OpCode::Text, true, 0b010, b"a"),
            frame_rsv(OpCode::Text, true, 0b110, b"a"),
            frame_rsv(OpCode::Binary, true, 0b001, b"a"),
        ];
        for bytes in cases {
            assert_eq!(
                decode_compressed(&bytes, DecoderLimits::default()),
                Err(ProtocolError::ReservedBitsSet),
                "{bytes:02x?}"
            );
        }
    }

    #[test]
    fn inflates_a_fragmented_compressed_message_around_control_frames() {
        let message = "{\"type\":\"publish\",\"data\":\"\u{e9}t\u{e9}\"}".repeat(40);
        let compressed = deflated(message.as_bytes());
        let (first, rest) = compressed.split_at(compressed.len() / 3);
        let mut bytes = frame_rsv(OpCode::Text, false, 0b100, first);
        bytes.extend(frame(OpCode::Ping, true, b"p"));
        bytes.extend(frame(OpCode::Continuation, true, rest));
        bytes.extend(frame(OpCode::Text, true, b"plain"));
        let messages = decode_compressed(&bytes, DecoderLimits::default()).unwrap();
        assert_eq!(
            messages,
            [
                Message::Ping(Bytes::from_static(b"p")),
                text(&message),
                text("plain")
            ]
        );
    }

    #[test]
    fn refuses_a_compressed_message_over_the_limit_once_inflated_with_1009() {
        let bomb = deflated(&vec![b'a'; 1 << 20]);
        let limits = DecoderLimits {
            max_message_bytes: 4096,
            max_frame_bytes: 4096,
            max_fragments: 16,
        };
        assert!(bomb.len() < 4096);
        let error =
            decode_compressed(&frame_rsv(OpCode::Text, true, 0b100, &bomb), limits).unwrap_err();
        assert_eq!(
            error,
            ProtocolError::MessageTooBig {
                size: 4097,
                max: 4096
            }
        );
        assert_eq!(error.close_code(), 1009);
    }

    #[test]
    fn checks_utf8_and_deflate_data_of_compressed_text() {
        let invalid_utf8 = frame_rsv(OpCode::Text, true, 0b100, &deflated(b"ok \xff"));
        assert_eq!(
            decode_compressed(&invalid_utf8, DecoderLimits::default()),
            Err(ProtocolError::InvalidUtf8)
        );
        let binary = frame_rsv(OpCode::Binary, true, 0b100, &deflated(b"ok \xff"));
        assert_eq!(
            decode_compressed(&binary, DecoderLimits::default()).unwrap(),
            [Message::Binary(Bytes::from_static(b"ok \xff"))]
        );
        let garbage = frame_rsv(OpCode::Text, true, 0b100, &[0xff; 32]);
        assert_eq!(
            decode_compressed(&garbage, DecoderLimits::default()),
            Err(ProtocolError::InvalidCompressedData)
        );
    }
}
