//! The HTTP/1.1 request head (parsed with httparse) and the RFC 6455 §4.2 opening handshake:
//! validating an upgrade request and building the 101 response.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest as _, Sha1};

use crate::proto::error::HandshakeError;

/// The GUID appended to the client's key to compute Sec-WebSocket-Accept (RFC 6455 §1.3).
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Bounds on the request head, checked before anything is allocated for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Largest request head (request line and headers, with the blank line), in bytes.
    pub max_head_bytes: usize,
    /// Largest number of header fields.
    pub max_headers: usize,
}

impl Default for HandshakeLimits {
    /// 16 KiB and 100 headers: far above what browsers send, far below what would hurt.
    fn default() -> Self {
        Self {
            max_head_bytes: 16 * 1024,
            max_headers: 100,
        }
    }
}

/// A parsed request head, owning the parts the server reads.
///
/// List-valued headers that appear more than once (Upgrade, Connection, Sec-WebSocket-Protocol,
/// Sec-WebSocket-Extensions, Transfer-Encoding) are joined with ", " (RFC 9110 §5.3); the other
/// headers kept here may appear only once. Values are trimmed and not otherwise decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (methods are case-sensitive).
    pub method: String,
    /// The request target up to the `?`, not percent-decoded.
    pub path: String,
    /// The request target after the `?`, if there was one, not percent-decoded.
    pub query: Option<String>,
    /// The minor HTTP version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub version_minor: u8,
    /// `Host`.
    pub host: Option<String>,
    /// `Origin`.
    pub origin: Option<String>,
    /// `Authorization`.
    pub authorization: Option<String>,
    /// `Upgrade`.
    pub upgrade: Option<String>,
    /// `Connection`.
    pub connection: Option<String>,
    /// `Sec-WebSocket-Key`.
    pub sec_websocket_key: Option<String>,
    /// `Sec-WebSocket-Version`.
    pub sec_websocket_version: Option<String>,
    /// `Sec-WebSocket-Protocol`: the subprotocols the client offers, comma-separated.
    pub sec_websocket_protocol: Option<String>,
    /// `Sec-WebSocket-Extensions`: the extensions the client offers.
    pub sec_websocket_extensions: Option<String>,
    /// `Last-Event-ID`, sent by EventSource clients on reconnect.
    pub last_event_id: Option<String>,
    /// `X-Forwarded-For` (repeats joined with ", "), read only behind a trusted proxy.
    pub x_forwarded_for: Option<String>,
    /// `Content-Length`, parsed.
    pub content_length: Option<u64>,
    /// `Transfer-Encoding`.
    pub transfer_encoding: Option<String>,
}

/// Where the first blank line (the end of a request head) ends in `buf`, looking at
/// `buf[from..]` and the two bytes before it (a line end split across reads). Accepts
/// what [`parse_request`] accepts: CRLF or bare LF line ends.
#[must_use]
pub fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(2).min(buf.len());
    let mut at = start;
    while let Some(offset) = buf[at..].iter().position(|&b| b == b'\n') {
        let lf = at + offset;
        match buf.get(lf + 1..) {
            Some([b'\n', ..]) => return Some(lf + 2),
            Some([b'\r', b'\n', ..]) => return Some(lf + 3),
            _ => at = lf + 1,
        }
    }
    None
}

/// Parses a request head from the start of `buf`.
///
/// Returns the request and the length of its head; bytes after the head (a body, or a frame
/// the client sent right after its upgrade request) are left for the caller. Returns
/// `Ok(None)` when the head is not complete yet; call again with more bytes.
///
/// # Errors
/// [`HandshakeError::HeadTooLarge`] once `buf` holds more than `max_head_bytes` without a
/// complete head, [`HandshakeError::TooManyHeaders`], and the 400 errors for malformed heads,
/// duplicated single-valued headers and bad Content-Length values.
pub fn parse_request(
    buf: &[u8],
    limits: &HandshakeLimits,
) -> Result<Option<(Request, usize)>, HandshakeError> {
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_head_bytes => {
            return Err(HandshakeError::HeadTooLarge {
                max: limits.max_head_bytes,
            });
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HandshakeError::TooManyHeaders {
                max: limits.max_headers,
            });
        }
        Err(error) => return Err(HandshakeError::Malformed(error)),
    };
    if head_len > limits.max_head_bytes {
        return Err(HandshakeError::HeadTooLarge {
            max: limits.max_head_bytes,
        });
    }

    // A complete parse always fills in the request line.
    let target = parsed.path.unwrap_or_default();
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (target, None),
    };
    let mut request = Request {
        method: parsed.method.unwrap_or_default().to_owned(),
        path: path.to_owned(),
        query,
        version_minor: parsed.version.unwrap_or_default(),
        ..Request::default()
    };
    for header in parsed.headers.iter() {
        request.add_header(header.name, header.value)?;
    }
    if request.content_length.is_some() && request.transfer_encoding.is_some() {
        return Err(HandshakeError::ConflictingBodyLength);
    }
    Ok(Some((request, head_len)))
}

impl Request {
    /// Whether the client asks for a WebSocket upgrade (it sent `Upgrade` or
    /// `Sec-WebSocket-Key`); such a request gets [`Request::websocket_accept`] or a rejection,
    /// never a plain HTTP response.
    #[must_use]
    pub fn is_upgrade(&self) -> bool {
        self.upgrade.is_some() || self.sec_websocket_key.is_some()
    }

    /// Checks the upgrade request against RFC 6455 §4.2.1 and returns the
    /// `Sec-WebSocket-Accept` value for the 101 response.
    ///
    /// # Errors
    /// The first rule the request breaks, in the order: GET, HTTP/1.1, Host, Upgrade,
    /// Connection, Sec-WebSocket-Version (426), Sec-WebSocket-Key, no body.
    pub fn websocket_accept(&self) -> Result<String, HandshakeError> {
        if self.method != "GET" {
            return Err(HandshakeError::MethodNotGet);
        }
        if self.version_minor < 1 {
            return Err(HandshakeError::HttpVersion);
        }
        if self.host.is_none() {
            return Err(HandshakeError::MissingHost);
        }
        if !has_token(self.upgrade.as_deref(), "websocket") {
            return Err(HandshakeError::UpgradeNotWebSocket);
        }
        if !has_token(self.connection.as_deref(), "upgrade") {
            return Err(HandshakeError::ConnectionNotUpgrade);
        }
        if self.sec_websocket_version.as_deref() != Some("13") {
            return Err(HandshakeError::UnsupportedVersion);
        }
        let key = self
            .sec_websocket_key
            .as_deref()
            .ok_or(HandshakeError::MissingKey)?;
        if !is_valid_key(key) {
            return Err(HandshakeError::InvalidKey);
        }
        if self.content_length.is_some_and(|len| len > 0) || self.transfer_encoding.is_some() {
            return Err(HandshakeError::BodyOnUpgrade);
        }
        Ok(accept_key(key))
    }

    /// The raw (not percent-decoded) value of the first `name=value` pair in the query; a
    /// name without `=` has the value "".
    #[must_use]
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then_some(value)
        })
    }

    /// Stores one header field if the server reads it.
    fn add_header(&mut self, name: &str, value: &[u8]) -> Result<(), HandshakeError> {
        let Some(&(name, kind)) = KNOWN_HEADERS
            .iter()
            .find(|(known, _)| known.eq_ignore_ascii_case(name))
        else {
            return Ok(());
        };
        let value = std::str::from_utf8(value)
            .map_err(|_| HandshakeError::InvalidHeaderValue(name))?
            .trim_ascii();
        let slot = match kind {
            Known::Host => &mut self.host,
            Known::Origin => &mut self.origin,
            Known::Authorization => &mut self.authorization,
            Known::Upgrade => &mut self.upgrade,
            Known::Connection => &mut self.connection,
            Known::Key => &mut self.sec_websocket_key,
            Known::Version => &mut self.sec_websocket_version,
            Known::Protocol => &mut self.sec_websocket_protocol,
            Known::Extensions => &mut self.sec_websocket_extensions,
            Known::LastEventId => &mut self.last_event_id,
            Known::ForwardedFor => &mut self.x_forwarded_for,
            Known::TransferEncoding => &mut self.transfer_encoding,
            Known::ContentLength => return self.add_content_length(value),
        };
        match slot {
            None => *slot = Some(value.to_owned()),
            Some(list) if kind.is_list() => {
                list.push_str(", ");
                list.push_str(value);
            }
            Some(_) => return Err(HandshakeError::DuplicateHeader(name)),
        }
        Ok(())
    }

    /// Content-Length must be digits only (no sign); a repeat must carry the same value.
    fn add_content_length(&mut self, value: &str) -> Result<(), HandshakeError> {
        if value.is_empty() || !value.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(HandshakeError::InvalidContentLength);
        }
        let len: u64 = value
            .parse()
            .map_err(|_| HandshakeError::InvalidContentLength)?;
        match self.content_length {
            Some(previous) if previous != len => Err(HandshakeError::InvalidContentLength),
            _ => {
                self.content_length = Some(len);
                Ok(())
            }
        }
    }
}

/// The header fields [`Request`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Host,
    Origin,
    Authorization,
    Upgrade,
    Connection,
    Key,
    Version,
    Protocol,
    Extensions,
    LastEventId,
    ForwardedFor,
    ContentLength,
    TransferEncoding,
}

impl Known {
    /// Whether the field is a comma-separated list, so repeats are joined, not rejected.
    fn is_list(self) -> bool {
        matches!(
            self,
            Self::Upgrade
                | Self::Connection
                | Self::Protocol
                | Self::Extensions
                | Self::TransferEncoding
                | Self::ForwardedFor
        )
    }
}

const KNOWN_HEADERS: &[(&str, Known)] = &[
    ("host", Known::Host),
    ("origin", Known::Origin),
    ("authorization", Known::Authorization),
    ("upgrade", Known::Upgrade),
    ("connection", Known::Connection),
    ("sec-websocket-key", Known::Key),
    ("sec-websocket-version", Known::Version),
    ("sec-websocket-protocol", Known::Protocol),
    ("sec-websocket-extensions", Known::Extensions),
    ("last-event-id", Known::LastEventId),
    ("x-forwarded-for", Known::ForwardedFor),
    ("content-length", Known::ContentLength),
    ("transfer-encoding", Known::TransferEncoding),
];

/// Whether the comma-separated `list` contains `token`, ignoring ASCII case.
pub(super) fn has_token(list: Option<&str>, token: &str) -> bool {
    list.is_some_and(|list| {
        list.split(',')
            .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// Whether `key` is base64 for exactly 16 bytes (RFC 6455 §4.1): 24 characters with padding.
fn is_valid_key(key: &str) -> bool {
    key.len() == 24 && BASE64.decode(key).is_ok_and(|nonce| nonce.len() == 16)
}

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2):
/// base64 of the SHA-1 of the key followed by the WebSocket GUID.
#[must_use]
pub fn accept_key(key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(WEBSOCKET_GUID.as_bytes());
    BASE64.encode(sha1.finalize())
}

/// The complete `101 Switching Protocols` response head, with the chosen subprotocol and
/// the accepted extensions (a `Sec-WebSocket-Extensions` value) if any.
#[must_use]
pub fn upgrade_response(accept: &str, protocol: Option<&str>, extensions: Option<&str>) -> Vec<u8> {
    let mut response = String::with_capacity(160);
    response.push_str(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    response.push_str("Sec-WebSocket-Accept: ");
    response.push_str(accept);
    response.push_str("\r\n");
    if let Some(protocol) = protocol {
        response.push_str("Sec-WebSocket-Protocol: ");
        response.push_str(protocol);
        response.push_str("\r\n");
    }
    if let Some(extensions) = extensions {
        response.push_str("Sec-WebSocket-Extensions: ");
        response.push_str(extensions);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    response.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &str = "GET /ws?channel=news&token=abc HTTP/1.1\r\n\
        Host: server.example.com\r\n\
        Upgrade: websocket\r\n\
        Connection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Origin: http://example.com\r\n\
        Sec-WebSocket-Protocol: chat, superchat\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    fn parse(head: &str) -> Result<Option<(Request, usize)>, HandshakeError> {
        parse_request(head.as_bytes(), &HandshakeLimits::default())
    }

    fn parse_complete(head: &str) -> Request {
        parse(head).unwrap().unwrap().0
    }

    /// The sample upgrade with `from` replaced by `to`, then validated.
    fn accept_with(from: &str, to: &str) -> Result<String, HandshakeError> {
        assert!(UPGRADE.contains(from), "{from}");
        parse(&UPGRADE.replacen(from, to, 1))?
            .expect("complete head")
            .0
            .websocket_accept()
    }

    #[test]
    fn computes_rfc_sample_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn accepts_rfc_sample_upgrade() {
        let (request, len) = parse(UPGRADE).unwrap().unwrap();
        assert_eq!(len, UPGRADE.len());
        assert!(request.is_upgrade());
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/ws");
        assert_eq!(request.query.as_deref(), Some("channel=news&token=abc"));
        assert_eq!(request.version_minor, 1);
        assert_eq!(request.host.as_deref(), Some("server.example.com"));
        assert_eq!(request.origin.as_deref(), Some("http://example.com"));
        assert_eq!(
            request.sec_websocket_protocol.as_deref(),
            Some("chat, superchat")
        );
        assert_eq!(
            request.websocket_accept().unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn reads_query_params() {
        let request = parse_complete("GET /sse?a=1&flag&b=x%20y&a=2 HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(request.query_param("a"), Some("1"));
        assert_eq!(request.query_param("flag"), Some(""));
        assert_eq!(request.query_param("b"), Some("x%20y"));
        assert_eq!(request.query_param("missing"), None);
        assert!(!request.is_upgrade());
        let request = parse_complete("GET / HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(request.query, None);
        assert_eq!(request.query_param("a"), None);
    }

    #[test]
    fn accepts_header_spelling_variants() {
        let variants = [
            ("Upgrade: websocket", "upgrade: WebSocket"),
            ("Upgrade: websocket", "UPGRADE: h2c, WEBSOCKET"),
            ("Connection: Upgrade", "Connection: keep-alive, Upgrade"),
            ("Connection: Upgrade", "connection: keep-alive,upgrade"),
            (
                "Connection: Upgrade",
                "Connection: keep-alive\r\nConnection: upgrade",
            ),
            ("Sec-WebSocket-Key:", "sec-websocket-key:"),
            ("Sec-WebSocket-Version: 13", "SEC-WEBSOCKET-VERSION:   13  "),
            ("Host:", "hOsT:"),
        ];
        for (from, to) in variants {
            assert_eq!(
                accept_with(from, to).as_deref(),
                Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
                "{to}"
            );
        }
    }

    #[test]
    fn rejects_each_broken_rule_with_its_status() {
        let cases = [
            ("GET /ws", "POST /ws", HandshakeError::MethodNotGet, 405),
            ("HTTP/1.1", "HTTP/1.0", HandshakeError::HttpVersion, 400),
            (
                "Host: server.example.com\r\n",
                "",
                HandshakeError::MissingHost,
                400,
            ),
            (
                "Upgrade: websocket",
                "Upgrade: h2c",
                HandshakeError::UpgradeNotWebSocket,
                400,
            ),
            (
                "Connection: Upgrade",
                "Connection: keep-alive",
                HandshakeError::ConnectionNotUpgrade,
                400,
            ),
            (
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Version: 8",
                HandshakeError::UnsupportedVersion,
                426,
            ),
            (
                "Sec-WebSocket-Version: 13\r\n",
                "",
                HandshakeError::UnsupportedVersion,
                426,
            ),
            (
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
                "",
                HandshakeError::MissingKey,
                400,
            ),
            (
                "dGhlIHNhbXBsZSBub25jZQ==",
                "dGhlIHNhbXBsZSBub25jZQ",
                HandshakeError::InvalidKey,
                400,
            ),
            (
                "dGhlIHNhbXBsZSBub25jZQ==",
                "dGhlIHNhbXBsZSBub25jZSE=",
                HandshakeError::InvalidKey,
                400,
            ),
            (
                "dGhlIHNhbXBsZSBub25jZQ==",
                "dGhlIHNhbXBsZSBub25j!Q==",
                HandshakeError::InvalidKey,
                400,
            ),
            (
                "Origin:",
                "Content-Length: 5\r\nOrigin:",
                HandshakeError::BodyOnUpgrade,
                400,
            ),
            (
                "Origin:",
                "Transfer-Encoding: chunked\r\nOrigin:",
                HandshakeError::BodyOnUpgrade,
                400,
            ),
        ];
        for (from, to, error, status) in cases {
            let result = accept_with(from, to);
            assert_eq!(result, Err(error.clone()), "{to}");
            assert_eq!(error.status(), status, "{to}");
        }
        assert_eq!(
            accept_with("Origin:", "Content-Length: 0\r\nOrigin:").as_deref(),
            Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
    }

    #[test]
    fn rejects_malformed_heads_and_duplicates() {
        let cases = [
            ("GET /ws HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
            ("GET /ws HTTP/2.0\r\nHost: h\r\n\r\n", 400),
        ];
        for (head, status) in cases {
            let error = parse(head).unwrap_err();
            assert_eq!(error.status(), status, "{head:?}: {error}");
        }
        let bad_headers = [
            "Host: b\r\n",
            "Authorization: a\r\nauthorization: b\r\n",
            "Sec-WebSocket-Key: a\r\nSec-WebSocket-Key: b\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        ];
        for headers in bad_headers {
            let head = format!("POST /p HTTP/1.1\r\nHost: a\r\n{headers}\r\n");
            let error = parse(&head).unwrap_err();
            assert_eq!(error.status(), 400, "{head:?}: {error}");
        }
        assert_eq!(
            parse("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            Err(HandshakeError::DuplicateHeader("host"))
        );
        let request = parse_complete(
            "POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        );
        assert_eq!(request.content_length, Some(5));
    }

    #[test]
    fn rejects_non_utf8_value_of_a_kept_header_only() {
        assert_eq!(
            parse_request(
                b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n",
                &HandshakeLimits::default()
            ),
            Err(HandshakeError::InvalidHeaderValue("host"))
        );
        let parsed = parse_request(
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Other: \xff\r\n\r\n",
            &HandshakeLimits::default(),
        );
        assert!(parsed.unwrap().is_some());
    }

    #[test]
    fn partial_heads_need_more_bytes_then_parse_identically() {
        let whole = parse(UPGRADE).unwrap().unwrap();
        for end in 0..UPGRADE.len() {
            assert_eq!(parse(&UPGRADE[..end]), Ok(None), "prefix {end}");
        }
        assert_eq!(parse(UPGRADE).unwrap().unwrap(), whole);
    }

    #[test]
    fn leaves_pipelined_bytes_after_the_head() {
        let mut bytes = UPGRADE.as_bytes().to_vec();
        bytes.extend_from_slice(&[0x81, 0x85, 1, 2, 3, 4, 5]);
        let (_, len) = parse_request(&bytes, &HandshakeLimits::default())
            .unwrap()
            .unwrap();
        assert_eq!(len, UPGRADE.len());
        assert_eq!(&bytes[len..], &[0x81, 0x85, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn rejects_heads_over_the_size_limit() {
        let limits = HandshakeLimits {
            max_head_bytes: 64,
            max_headers: 100,
        };
        let partial = format!("GET / HTTP/1.1\r\nX-Long: {}", "a".repeat(64));
        assert_eq!(
            parse_request(partial.as_bytes(), &limits),
            Err(HandshakeError::HeadTooLarge { max: 64 })
        );
        assert_eq!(parse_request(&partial.as_bytes()[..64], &limits), Ok(None));
        let complete = format!("{partial}\r\n\r\n");
        let error = parse_request(complete.as_bytes(), &limits).unwrap_err();
        assert_eq!(error.status(), 431);
    }

    #[test]
    fn rejects_too_many_headers() {
        let limits = HandshakeLimits {
            max_head_bytes: 16 * 1024,
            max_headers: 3,
        };
        let head = "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        let error = parse_request(head.as_bytes(), &limits).unwrap_err();
        assert_eq!(error, HandshakeError::TooManyHeaders { max: 3 });
        assert_eq!(error.status(), 431);
    }

    #[test]
    fn builds_upgrade_response() {
        let accept = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
        assert_eq!(
            upgrade_response(accept, None, None),
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        let response = String::from_utf8(upgrade_response(accept, Some("chat"), None)).unwrap();
        assert!(response.ends_with("\r\nSec-WebSocket-Protocol: chat\r\n\r\n"));
        let response =
            String::from_utf8(upgrade_response(accept, None, Some("permessage-deflate"))).unwrap();
        assert!(response.ends_with("=\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"));
    }

    #[test]
    fn head_end_finds_blank_line_across_reads() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest";
        assert_eq!(head_end(head, 0), Some(head.len() - 4));
        for from in 0..head.len() - 4 {
            assert_eq!(head_end(head, from), Some(head.len() - 4), "from {from}");
        }
        let bare = b"GET / HTTP/1.1\nHost: a\n\n";
        assert_eq!(head_end(bare, 0), Some(bare.len()));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        assert_eq!(head_end(b"abc", 10), None);
    }
}
