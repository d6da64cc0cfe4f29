//! One socket's WebSocket protocol after the upgrade: messages out of the read buffer, pongs
//! and the close handshake (RFC 6455 §5.5, §7) into a queue of frames to send, and the
//! connection's permessage-deflate compressor when it negotiated one.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::proto::decoder::{Decoder, DecoderLimits, Message};
use crate::proto::deflate::{Compressor, CompressorSettings, DeflateParams, Inflater};
use crate::proto::error::ProtocolError;
use crate::proto::frame::{OpCode, encode_close, encode_frame};

/// What the caller learns from [`Connection::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete data message from the client; `text` payloads are valid UTF-8.
    Message {
        /// Whether it was a text (not binary) message.
        text: bool,
        /// The payload, often a slice of the read buffer's allocation: drop it promptly.
        payload: Bytes,
    },
    /// The client sent a close frame (with `code`, or without one). Any close reply is
    /// already queued; flush [`Connection::poll_transmit`], then close the socket.
    Closed {
        /// The client's close code, `None` if its close frame was empty.
        code: Option<u16>,
    },
    /// The client broke the protocol. A close frame with the error's close code is queued
    /// (unless one was already sent); flush it, then close the socket.
    Failed(ProtocolError),
}

/// The close handshake state (RFC 6455 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Both directions carry messages.
    Open,
    /// The server sent a close and waits for the client's; data from the client is dropped.
    CloseSent,
    /// Close frames went both ways, or the connection failed; nothing more is read.
    Closed,
}

/// One client's WebSocket protocol state, from the 101 response to the close handshake.
///
/// # Calling contract
///
/// The connection owns no socket; the caller (a shard) moves bytes:
///
/// 1. Input: after each read appends bytes to the connection's read buffer, call
///    [`poll_event`](Self::poll_event) with that buffer until it returns `None`. The
///    connection consumes frames from the front of the buffer and may leave a partial frame
///    there (partly unmasked in place), so the caller must only ever append to the buffer,
///    never edit or drop bytes in it.
/// 2. Output: then call [`poll_transmit`](Self::poll_transmit) until it returns `None` and
///    queue each frame (pongs, close) on the socket's outbox, in order. Every item is a
///    whole frame, so they may go between the caller's own data frames but never inside one.
/// 3. Server-initiated close: [`send_close`](Self::send_close) (e.g. 1001 on shutdown), then
///    step 2; keep reading until the client's close arrives or a timeout passes (the clock
///    is the caller's). Send no data frames after it.
/// 4. Heartbeat: [`take_pong_received`](Self::take_pong_received) tells whether a pong
///    arrived since the last call.
/// 5. Compression: on a connection built with [`with_deflate`](Self::with_deflate),
///    [`encode_compressed`](Self::encode_compressed) turns a data message into a compressed
///    frame; queue those in the order they were made. Events carry inflated payloads.
/// 6. Once [`is_closed`](Self::is_closed) is true, flush the outbox and close the TCP
///    connection; the connection reads nothing more.
///
/// # State machine
///
/// ```text
///            send_close                 recv close (no echo)
///   Open ──────────────────▶ CloseSent ─────────────────────▶ Closed
///     │                          │ protocol error (no close)     ▲
///     │                          └───────────────────────────────┤
///     │ recv close (echo queued) / protocol error (close queued) │
///     └──────────────────────────────────────────────────────────┘
/// ```
#[derive(Debug)]
pub struct Connection {
    decoder: Decoder,
    state: State,
    /// Frames owed to the peer (pongs, a close), in order. Rare and taken at once: behind
    /// a pointer (8 bytes in every connection instead of a queue's 32), gone once empty.
    #[allow(clippy::box_collection)]
    transmit: Option<Box<VecDeque<Bytes>>>,
    pong_received: bool,
    /// The negotiated permessage-deflate parameters and this side's compressor (rare:
    /// behind a pointer).
    deflate: Option<Box<(DeflateParams, Compressor)>>,
}

impl Connection {
    /// A connection right after the upgrade, in the open state.
    #[must_use]
    pub fn new(limits: impl Into<Arc<DecoderLimits>>) -> Self {
        Self {
            decoder: Decoder::new(limits),
            state: State::Open,
            transmit: None,
            pong_received: false,
            deflate: None,
        }
    }

    /// A connection that negotiated permessage-deflate with `params`. Its compressor uses
    /// `settings` within the negotiated window, and keeps its window between messages only
    /// if `take_over_context` and the client allowed it.
    #[must_use]
    pub fn with_deflate(
        limits: impl Into<Arc<DecoderLimits>>,
        params: DeflateParams,
        settings: CompressorSettings,
        take_over_context: bool,
    ) -> Self {
        let reset_each_message = params.server_no_context_takeover || !take_over_context;
        let compressor = Compressor::new(
            settings.within(params.server_max_window_bits),
            reset_each_message,
        );
        Self {
            decoder: Decoder::with_inflater(limits, Inflater::default()),
            state: State::Open,
            transmit: None,
            pong_received: false,
            deflate: Some(Box::new((params, compressor))),
        }
    }

    /// Whether permessage-deflate was negotiated.
    #[must_use]
    pub fn compresses(&self) -> bool {
        self.deflate.is_some()
    }

    /// Whether the compressor keeps its window between messages: every compressed frame it
    /// makes must then reach the client, in order, and no other compressed frame may go in
    /// between (the client's window would hold data this compressor never saw).
    #[must_use]
    pub fn takes_over_context(&self) -> bool {
        self.deflate
            .as_deref()
            .is_some_and(|(_, compressor)| compressor.takes_over_context())
    }

    /// Whether a frame compressed elsewhere from an empty window of `window_bits` (a shared
    /// broadcast frame) may be sent on this connection.
    #[must_use]
    pub fn accepts_frames_compressed_with(&self, window_bits: u8) -> bool {
        self.deflate.as_deref().is_some_and(|(params, compressor)| {
            !compressor.takes_over_context() && window_bits <= params.server_max_window_bits
        })
    }

    /// A data message as one compressed frame, or `None` if deflate was not negotiated.
    #[must_use]
    pub fn encode_compressed(&mut self, text: bool, payload: &[u8]) -> Option<Bytes> {
        let (_, compressor) = self.deflate.as_deref_mut()?;
        let opcode = if text { OpCode::Text } else { OpCode::Binary };
        Some(compressor.encode_frame(opcode, payload))
    }

    /// How many compressed messages from the client were inflated so far.
    #[must_use]
    pub fn inflated_messages(&self) -> u64 {
        self.decoder.inflated_messages()
    }

    /// Decodes `buf` up to the next event for the caller, answering pings and closes on the
    /// way; `None` when `buf` needs more bytes or the connection is closed.
    #[must_use]
    pub fn poll_event(&mut self, buf: &mut BytesMut) -> Option<Event> {
        while self.state != State::Closed {
            let message = match self.decoder.decode(buf) {
                Ok(Some(message)) => message,
                Ok(None) => return None,
                Err(error) => return Some(self.fail(error)),
            };
            match message {
                Message::Text(payload) if self.state == State::Open => {
                    return Some(Event::Message {
                        text: true,
                        payload,
                    });
                }
                Message::Binary(payload) if self.state == State::Open => {
                    return Some(Event::Message {
                        text: false,
                        payload,
                    });
                }
                Message::Ping(payload) if self.state == State::Open => {
                    self.queue(encode_frame(OpCode::Pong, &payload));
                }
                // After our close, data and pings get no answer (RFC 6455 §5.5.1).
                Message::Text(_) | Message::Binary(_) | Message::Ping(_) => {}
                Message::Pong(_) => self.pong_received = true,
                Message::Close(close) => {
                    let code = close.map(|close| close.code);
                    self.recv_close(code);
                    return Some(Event::Closed { code });
                }
            }
        }
        None
    }

    /// The next frame to send, in the order they were queued.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        let queue = self.transmit.as_mut()?;
        let frame = queue.pop_front();
        if queue.is_empty() {
            self.transmit = None;
        }
        frame
    }

    fn queue(&mut self, frame: Bytes) {
        self.transmit.get_or_insert_default().push_back(frame);
    }

    /// Starts the close handshake from the server side; ignored once a close was sent or
    /// the connection is closed. The reason is cut to fit a control frame.
    pub fn send_close(&mut self, code: u16, reason: &str) {
        if self.state == State::Open {
            self.queue(encode_close(code, reason));
            self.state = State::CloseSent;
        }
    }

    /// Whether a pong arrived since the last call; clears the flag.
    pub fn take_pong_received(&mut self) -> bool {
        std::mem::take(&mut self.pong_received)
    }

    /// Whether the protocol is finished: nothing more will be read, and the socket should be
    /// closed once the queued frames are flushed.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The client's close: echo its code (or an empty close) unless we already sent one.
    fn recv_close(&mut self, code: Option<u16>) {
        if self.state == State::Open {
            let echo = match code {
                Some(code) => encode_close(code, ""),
                None => encode_frame(OpCode::Close, &[]),
            };
            self.queue(echo);
        }
        self.state = State::Closed;
    }

    /// Fails the connection (RFC 6455 §7.1.7): close with the error's code unless a close was
    /// already sent, and read nothing more.
    fn fail(&mut self, error: ProtocolError) -> Event {
        if self.state == State::Open {
            self.queue(encode_close(error.close_code(), &error.to_string()));
        }
        self.state = State::Closed;
        Event::Failed(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::close::parse_close_payload;
    use crate::proto::frame::{FrameHeader, encode_client_frame};

    const MASK: [u8; 4] = [0xa1, 0xb2, 0xc3, 0xd4];

    fn frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        encode_client_frame(opcode, fin, payload, MASK)
    }

    fn frames(parts: &[(OpCode, bool, &[u8])]) -> Vec<u8> {
        parts
            .iter()
            .flat_map(|&(opcode, fin, payload)| frame(opcode, fin, payload))
            .collect()
    }

    /// Feeds `bytes` in chunks of `chunk` bytes; returns the events and the sent frames.
    fn drive(conn: &mut Connection, bytes: &[u8], chunk: usize) -> (Vec<Event>, Vec<Bytes>) {
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        let mut sent = Vec::new();
        for piece in bytes.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(event) = conn.poll_event(&mut buf) {
                events.push(event);
            }
            while let Some(frame) = conn.poll_transmit() {
                sent.push(frame);
            }
        }
        (events, sent)
    }

    fn run(bytes: &[u8]) -> (Vec<Event>, Vec<Bytes>) {
        drive(
            &mut Connection::new(DecoderLimits::default()),
            bytes,
            usize::MAX,
        )
    }

    fn message(text: bool, payload: &[u8]) -> Event {
        Event::Message {
            text,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    /// The close code of a server close frame.
    fn sent_close_code(frame: &[u8]) -> Option<u16> {
        let (header, len) = FrameHeader::parse(frame).unwrap().unwrap();
        assert_eq!(header.opcode, OpCode::Close);
        assert_eq!(header.mask, None);
        parse_close_payload(&frame[len..])
            .unwrap()
            .map(|(code, _)| code)
    }

    #[test]
    fn delivers_fragmented_message_and_answers_interleaved_ping() {
        let bytes = frames(&[
            (OpCode::Text, false, b"Hel"),
            (OpCode::Ping, true, b"are you there"),
            (OpCode::Continuation, true, b"lo"),
        ]);
        let (events, sent) = run(&bytes);
        assert_eq!(events, [message(true, b"Hello")]);
        assert_eq!(sent, [encode_frame(OpCode::Pong, b"are you there")]);
    }

    #[test]
    fn answers_each_ping_with_one_pong() {
        let bytes = frames(&[(OpCode::Ping, true, b"1"), (OpCode::Ping, true, b"2")]);
        let (events, sent) = run(&bytes);
        assert!(events.is_empty());
        assert_eq!(
            sent,
            [
                encode_frame(OpCode::Pong, b"1"),
                encode_frame(OpCode::Pong, b"2")
            ]
        );
    }

    #[test]
    fn records_pong_for_heartbeat() {
        let mut conn = Connection::new(DecoderLimits::default());
        let (events, sent) = drive(&mut conn, &frame(OpCode::Pong, true, b"hb"), 1);
        assert!(events.is_empty() && sent.is_empty());
        assert!(conn.take_pong_received());
        assert!(!conn.take_pong_received());
    }

    #[test]
    fn echoes_client_close_code() {
        let mut conn = Connection::new(DecoderLimits::default());
        let (events, sent) = drive(&mut conn, &frame(OpCode::Close, true, b"\x0b\xb8bye"), 3);
        assert_eq!(events, [Event::Closed { code: Some(3000) }]);
        assert_eq!(sent, [encode_close(3000, "")]);
        assert!(conn.is_closed());
    }

    #[test]
    fn echoes_empty_close_with_empty_close() {
        let (events, sent) = run(&frame(OpCode::Close, true, b""));
        assert_eq!(events, [Event::Closed { code: None }]);
        assert_eq!(sent, [Bytes::from_static(&[0x88, 0x00])]);
    }

    #[test]
    fn ignores_everything_after_client_close() {
        let bytes = frames(&[
            (OpCode::Text, true, b"before"),
            (OpCode::Close, true, b"\x03\xe8"),
            (OpCode::Text, true, b"after"),
            (OpCode::Ping, true, b"after"),
            (OpCode::Close, true, b"\x03\xe8"),
        ]);
        let (events, sent) = run(&bytes);
        assert_eq!(
            events,
            [message(true, b"before"), Event::Closed { code: Some(1000) }]
        );
        assert_eq!(sent, [encode_close(1000, "")]);
    }

    #[test]
    fn ignores_garbage_after_client_close() {
        let mut bytes = frame(OpCode::Close, true, b"");
        bytes.extend_from_slice(&[0xff; 20]);
        let (events, sent) = run(&bytes);
        assert_eq!(events, [Event::Closed { code: None }]);
        assert_eq!(sent.len(), 1);
    }

    #[test]
    fn server_close_completes_on_client_close_without_echo() {
        let mut conn = Connection::new(DecoderLimits::default());
        conn.send_close(1001, "going away");
        conn.send_close(1000, "second close is ignored");
        assert_eq!(conn.poll_transmit(), Some(encode_close(1001, "going away")));
        assert_eq!(conn.poll_transmit(), None);
        assert!(!conn.is_closed());

        let bytes = frames(&[
            (OpCode::Text, true, b"late data"),
            (OpCode::Ping, true, b"late ping"),
            (OpCode::Close, true, b"\x03\xe9"),
        ]);
        let (events, sent) = drive(&mut conn, &bytes, 5);
        assert_eq!(events, [Event::Closed { code: Some(1001) }]);
        assert!(sent.is_empty());
        assert!(conn.is_closed());
    }

    #[test]
    fn protocol_error_after_server_close_sends_no_second_close() {
        let mut conn = Connection::new(DecoderLimits::default());
        conn.send_close(1001, "");
        let _ = conn.poll_transmit();
        let (events, sent) = drive(&mut conn, &[0x81, 0x00], 2);
        assert_eq!(events, [Event::Failed(ProtocolError::UnmaskedFrame)]);
        assert!(sent.is_empty());
        assert!(conn.is_closed());
    }

    #[test]
    fn fails_with_close_1002_on_protocol_error() {
        let (events, sent) = run(&frame(OpCode::Continuation, true, b"x"));
        assert_eq!(
            events,
            [Event::Failed(ProtocolError::UnexpectedContinuation)]
        );
        assert_eq!(sent.len(), 1);
        assert_eq!(sent_close_code(&sent[0]), Some(1002));
    }

    #[test]
    fn fails_with_close_1009_on_too_big_message() {
        let limits = DecoderLimits {
            max_frame_bytes: 64,
            max_message_bytes: 64,
            max_fragments: 1024,
        };
        let mut conn = Connection::new(limits);
        let bytes = frame(OpCode::Binary, true, &[0; 65]);
        let (events, sent) = drive(&mut conn, &bytes[..8], 8);
        assert_eq!(
            events,
            [Event::Failed(ProtocolError::MessageTooBig {
                size: 65,
                max: 64
            })]
        );
        assert_eq!(sent_close_code(&sent[0]), Some(1009));
        assert!(conn.is_closed());
    }

    #[test]
    fn fails_with_close_1007_on_invalid_utf8_in_every_position() {
        let valid = "h\u{e9}llo \u{20ac} w\u{10348}rld".as_bytes();
        for position in 0..valid.len() {
            let mut payload = valid.to_vec();
            payload[position] = 0xff;
            let unfragmented = frame(OpCode::Text, true, &payload);
            let fragmented = frames(&[
                (OpCode::Text, false, &payload[..position / 2]),
                (
                    OpCode::Continuation,
                    false,
                    &payload[position / 2..=position],
                ),
                (OpCode::Continuation, true, &payload[position + 1..]),
            ]);
            for bytes in [unfragmented, fragmented] {
                for chunk in [1, 3, usize::MAX] {
                    let mut conn = Connection::new(DecoderLimits::default());
                    let (events, sent) = drive(&mut conn, &bytes, chunk);
                    assert_eq!(
                        events,
                        [Event::Failed(ProtocolError::InvalidUtf8)],
                        "position {position} chunk {chunk}"
                    );
                    assert_eq!(sent_close_code(&sent[0]), Some(1007));
                }
            }
        }
    }

    #[test]
    fn fails_on_invalid_utf8_in_close_reason_with_1007() {
        let (events, sent) = run(&frame(OpCode::Close, true, b"\x03\xe8\xc0\xaf"));
        assert_eq!(events, [Event::Failed(ProtocolError::InvalidUtf8)]);
        assert_eq!(sent_close_code(&sent[0]), Some(1007));
    }

    #[test]
    fn bytewise_delivery_matches_whole_delivery() {
        let bytes = frames(&[
            (OpCode::Text, true, "caf\u{e9}".as_bytes()),
            (OpCode::Binary, false, &[1; 200]),
            (OpCode::Ping, true, b"p"),
            (OpCode::Continuation, false, b""),
            (OpCode::Pong, true, b""),
            (OpCode::Continuation, true, &[2; 70_000]),
            (OpCode::Text, true, b""),
            (OpCode::Close, true, b"\x03\xe8done"),
        ]);
        let whole = run(&bytes);
        assert_eq!(whole.0.len(), 4);
        assert_eq!(whole.1.len(), 2);
        for chunk in [1, 2, 7, 4096] {
            let mut conn = Connection::new(DecoderLimits::default());
            assert_eq!(drive(&mut conn, &bytes, chunk), whole, "chunk {chunk}");
        }
    }

    fn deflate_params(offer: &str) -> DeflateParams {
        crate::proto::deflate::negotiate(offer).expect("an acceptable offer")
    }

    #[test]
    fn compressing_connection_inflates_events_and_compresses_on_request() {
        let params = deflate_params("permessage-deflate");
        let mut conn = Connection::with_deflate(
            DecoderLimits::default(),
            params,
            CompressorSettings::PER_CONNECTION,
            true,
        );
        assert!(conn.compresses() && conn.takes_over_context());
        assert!(!conn.accepts_frames_compressed_with(15));
        let reply = conn.encode_compressed(true, b"hello hello hello").unwrap();
        let (header, len) = FrameHeader::parse(&reply).unwrap().unwrap();
        assert_eq!((header.rsv, header.opcode), (0b100, OpCode::Text));

        // The client echoes the compressed payload back, with RSV1.
        let mut echoed = frame(OpCode::Text, true, &reply[len..]);
        echoed[0] |= 0x40;
        let (events, sent) = drive(&mut conn, &echoed, usize::MAX);
        assert_eq!(events, [message(true, b"hello hello hello")]);
        assert!(sent.is_empty());
        assert_eq!(conn.inflated_messages(), 1);
    }

    #[test]
    fn context_takeover_follows_the_offer_and_the_policy() {
        let limits = DecoderLimits::default();
        let settings = CompressorSettings::PER_CONNECTION;
        let refused = deflate_params("permessage-deflate; server_no_context_takeover");
        let conn = Connection::with_deflate(limits, refused, settings, true);
        assert!(!conn.takes_over_context());
        assert!(conn.accepts_frames_compressed_with(15));
        let limited = deflate_params("permessage-deflate; server_max_window_bits=10");
        let conn = Connection::with_deflate(limits, limited, settings, false);
        assert!(conn.accepts_frames_compressed_with(10));
        assert!(!conn.accepts_frames_compressed_with(15));
        let mut plain = Connection::new(limits);
        assert!(!plain.compresses() && !plain.takes_over_context());
        assert_eq!(plain.encode_compressed(true, b"x"), None);
    }
}
