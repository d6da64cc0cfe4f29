//! Errors of the protocol core: one `ProtocolError` variant per RFC 6455 rule, each mapped to
//! the close code that fails the connection, and one `HandshakeError` variant per rejected
//! upgrade, each mapped to an HTTP status; `ClientHandshakeError` for a client whose upgrade
//! the server did not complete.

/// A frame or message broke a rule of RFC 6455; the connection must be failed (§7.1.7) with
/// the close code from [`ProtocolError::close_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// §5.1: a server MUST close the connection on a frame from the client that is not masked.
    #[error("client frame is not masked")]
    UnmaskedFrame,
    /// §5.2: RSV1-3 MUST be 0 unless an extension that defines them was negotiated; with
    /// permessage-deflate, RSV1 only on the first frame of a data message (RFC 7692 §6.1).
    #[error("reserved bits set without a negotiated extension")]
    ReservedBitsSet,
    /// §5.2: opcodes 0x3-0x7 and 0xB-0xF are reserved; receiving one MUST fail the connection.
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// §5.5: control frames MUST NOT be fragmented.
    #[error("fragmented control frame")]
    FragmentedControlFrame,
    /// §5.5: control frames MUST have a payload length of 125 bytes or less.
    #[error("control frame payload longer than 125 bytes")]
    ControlFrameTooLong,
    /// §5.2: the payload length MUST be encoded in the minimal number of bytes.
    #[error("payload length not minimally encoded")]
    NonMinimalLength,
    /// §5.2: the most significant bit of a 64-bit payload length MUST be 0.
    #[error("64-bit payload length with the most significant bit set")]
    LengthMsbSet,
    /// §8.1: text messages and close reasons MUST be valid UTF-8; close code 1007 (§7.4.1).
    #[error("invalid utf-8")]
    InvalidUtf8,
    /// §5.5.1: a close payload is empty or starts with a 2-byte code, so 1 byte is invalid.
    #[error("close payload of 1 byte")]
    InvalidClosePayload,
    /// §7.4: the close code is reserved, unassigned or not allowed on the wire.
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// §5.4: a continuation frame arrived with no fragmented message in progress.
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    /// §5.4: a new text or binary frame arrived while a fragmented message was unfinished.
    #[error("new message started before the fragmented one finished")]
    ExpectedContinuation,
    /// RFC 7692 §7.2.2: a compressed message is not a valid DEFLATE stream; failed with
    /// 1007, the code for data inconsistent with the message's type.
    #[error("compressed message is not valid deflate data")]
    InvalidCompressedData,
    /// §7.4.1 (code 1009): a frame or message is larger than this server accepts.
    #[error("message of {size} bytes exceeds the limit of {max} bytes")]
    MessageTooBig {
        /// Size announced so far, in bytes.
        size: u64,
        /// Configured limit, in bytes.
        max: u64,
    },
    /// §7.4.1 (code 1009): a message arrives in more frames than this server accepts.
    #[error("message arrives in more than {max} frames")]
    TooManyFragments {
        /// Configured limit of frames per message.
        max: u32,
    },
}

impl ProtocolError {
    /// The close code to send when failing the connection for this error (RFC 6455 §7.4.1).
    #[must_use]
    pub fn close_code(&self) -> u16 {
        match self {
            Self::InvalidUtf8 | Self::InvalidCompressedData => 1007,
            Self::MessageTooBig { .. } | Self::TooManyFragments { .. } => 1009,
            _ => 1002,
        }
    }
}

/// Why an HTTP/1.1 request was not accepted, either as HTTP at all or as a WebSocket upgrade.
///
/// [`HandshakeError::status`] is the response status and [`HandshakeError::extra_headers`] the
/// headers that status requires; `Display` is a one-line reason for the response body or log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The request head is not valid HTTP/1.x (RFC 9112 §2).
    #[error("malformed request: {0}")]
    Malformed(httparse::Error),
    /// The request head is larger than the configured limit.
    #[error("request head exceeds {max} bytes")]
    HeadTooLarge {
        /// Configured limit, in bytes.
        max: usize,
    },
    /// The request has more header fields than the configured limit.
    #[error("request has more than {max} headers")]
    TooManyHeaders {
        /// Configured limit, in header fields.
        max: usize,
    },
    /// A header the server reads is not valid UTF-8.
    #[error("header {0} is not valid utf-8")]
    InvalidHeaderValue(&'static str),
    /// A header that must appear at most once appeared twice (RFC 9110 §5.3; Host: RFC 9112
    /// §3.2; Sec-WebSocket-Key: RFC 6455 §4.1).
    #[error("duplicate {0} header")]
    DuplicateHeader(&'static str),
    /// Content-Length is not a number, or appears twice with different values (RFC 9112
    /// §6.3).
    #[error("invalid content-length")]
    InvalidContentLength,
    /// Both Content-Length and Transfer-Encoding are present, a request smuggling vector
    /// (RFC 9112 §6.1).
    #[error("both content-length and transfer-encoding present")]
    ConflictingBodyLength,
    /// RFC 6455 §4.1: the upgrade request MUST use the GET method.
    #[error("websocket upgrade must use GET")]
    MethodNotGet,
    /// RFC 6455 §4.1: the upgrade request MUST be HTTP/1.1 or later.
    #[error("websocket upgrade requires http/1.1")]
    HttpVersion,
    /// RFC 6455 §4.1 / RFC 9112 §3.2: the Host header is required.
    #[error("missing host header")]
    MissingHost,
    /// RFC 6455 §4.2.1: Upgrade MUST include the token "websocket".
    #[error("upgrade header does not contain websocket")]
    UpgradeNotWebSocket,
    /// RFC 6455 §4.2.1: Connection MUST include the token "Upgrade".
    #[error("connection header does not contain upgrade")]
    ConnectionNotUpgrade,
    /// RFC 6455 §4.2.1: Sec-WebSocket-Key is required.
    #[error("missing sec-websocket-key header")]
    MissingKey,
    /// RFC 6455 §4.1: Sec-WebSocket-Key MUST be 16 bytes, base64-encoded.
    #[error("sec-websocket-key is not 16 base64-encoded bytes")]
    InvalidKey,
    /// RFC 6455 §4.2.2: Sec-WebSocket-Version is missing or not 13; answered with 426.
    #[error("unsupported websocket version, only 13 is supported")]
    UnsupportedVersion,
    /// An upgrade request carries a body (Content-Length > 0 or Transfer-Encoding); RFC 6455
    /// §4.1 defines none, and reading past it would mix HTTP body bytes with frames.
    #[error("websocket upgrade request has a body")]
    BodyOnUpgrade,
}

impl HandshakeError {
    /// The HTTP status code of the rejection response.
    #[must_use]
    pub fn status(&self) -> u16 {
        match self {
            Self::HeadTooLarge { .. } | Self::TooManyHeaders { .. } => 431,
            Self::MethodNotGet => 405,
            Self::UnsupportedVersion => 426,
            _ => 400,
        }
    }

    /// Headers the rejection response must carry: `Allow` for 405 (RFC 9110 §15.5.6) and
    /// `Sec-WebSocket-Version` for 426 (RFC 6455 §4.2.2).
    #[must_use]
    pub fn extra_headers(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::MethodNotGet => &[("Allow", "GET")],
            Self::UnsupportedVersion => &[("Sec-WebSocket-Version", "13")],
            _ => &[],
        }
    }
}

/// Why a client fails the connection on the server's response to its upgrade request
/// (RFC 6455 §4.1, "the client MUST _Fail the WebSocket Connection_").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientHandshakeError {
    /// The response head is not valid HTTP/1.x (RFC 9112 §2).
    #[error("malformed response: {0}")]
    Malformed(httparse::Error),
    /// The response head is larger than the client reads.
    #[error("response head exceeds {max} bytes")]
    HeadTooLarge {
        /// The limit, in bytes.
        max: usize,
    },
    /// §4.1: a 101 MUST carry `Upgrade: websocket` and `Connection: Upgrade`.
    #[error("101 response without upgrade: websocket and connection: upgrade")]
    NotUpgraded,
    /// §4.1: `Sec-WebSocket-Accept` MUST be the one derived from the key sent.
    #[error("the server's sec-websocket-accept does not match the key sent")]
    WrongAccept,
    /// §4.1: the server accepted an extension the client did not offer.
    #[error("the server accepted extension {0}, which was not offered")]
    UnofferedExtension(String),
    /// §4.1: the server chose a subprotocol the client did not offer.
    #[error("the server chose subprotocol {0}, which was not offered")]
    UnofferedProtocol(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_follow_rfc_7_4_1() {
        assert_eq!(ProtocolError::InvalidUtf8.close_code(), 1007);
        assert_eq!(
            ProtocolError::MessageTooBig { size: 2, max: 1 }.close_code(),
            1009
        );
        assert_eq!(ProtocolError::InvalidCompressedData.close_code(), 1007);
        assert_eq!(ProtocolError::UnmaskedFrame.close_code(), 1002);
        assert_eq!(ProtocolError::InvalidCloseCode(1005).close_code(), 1002);
    }

    #[test]
    fn handshake_statuses_carry_required_headers() {
        assert_eq!(HandshakeError::UnsupportedVersion.status(), 426);
        assert_eq!(
            HandshakeError::UnsupportedVersion.extra_headers(),
            &[("Sec-WebSocket-Version", "13")]
        );
        assert_eq!(HandshakeError::MethodNotGet.status(), 405);
        assert_eq!(
            HandshakeError::MethodNotGet.extra_headers(),
            &[("Allow", "GET")]
        );
        assert_eq!(HandshakeError::HeadTooLarge { max: 1 }.status(), 431);
        assert_eq!(HandshakeError::MissingHost.status(), 400);
        assert!(HandshakeError::MissingHost.extra_headers().is_empty());
    }

    #[test]
    fn messages_are_one_lowercase_line() {
        let message = ProtocolError::MessageTooBig { size: 10, max: 5 }.to_string();
        assert_eq!(message, "message of 10 bytes exceeds the limit of 5 bytes");
        assert_eq!(
            HandshakeError::DuplicateHeader("host").to_string(),
            "duplicate host header"
        );
    }
}
