//! The WebSocket protocol core, sans-IO: bytes in, events and bytes out.
//!
//! Owns the HTTP/1.1 upgrade request ([`handshake`]) and the client's side of it
//! ([`client_handshake`]), the RFC 6455 frame codec ([`frame`],
//! [`mask`]), UTF-8 validation of text ([`utf8`]), message assembly ([`decoder`]), one
//! connection's close handshake ([`conn`], [`close`]), permessage-deflate ([`deflate`]) and
//! the `/ws` JSON commands ([`pubsub`]). Never touches sockets, never reads the clock, never spawns or blocks
//! threads: the shard feeds it bytes it has read and writes the bytes it hands back, so the
//! same code runs under both backends and in-memory tests.

#![deny(clippy::disallowed_methods)] // no clock reads here: see clippy.toml
#![deny(unsafe_code)]

pub mod client_handshake;
pub mod close;
pub mod conn;
pub mod decoder;
pub mod deflate;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod pubsub;
pub mod utf8;

pub use client_handshake::{Answer, ClientHandshake};
pub use close::{CloseFrame, is_valid_close_code, parse_close_payload};
pub use conn::{Connection, Event};
pub use decoder::{Decoder, DecoderLimits, Message};
pub use error::{ClientHandshakeError, HandshakeError, ProtocolError};
pub use frame::{FrameHeader, OpCode, encode_client_frame, encode_close, encode_frame};
pub use handshake::{HandshakeLimits, Request, accept_key, parse_request, upgrade_response};
pub use mask::apply_mask;
pub use utf8::Utf8Validator;
