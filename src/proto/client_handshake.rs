//! The client side of the RFC 6455 §4.1 opening handshake, sans-IO: the upgrade request's
//! bytes, and the server's response head read from whatever bytes have arrived so far.
//! `herald client`, the bench client, the benches and the tests all shake hands through it,
//! so none of them drifts from the server's side in [`super::handshake`].

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::error::ClientHandshakeError;
use super::handshake::{accept_key, has_token};

/// Largest response head read, as the server's request head limit.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Most header fields read in a response head.
const MAX_RESPONSE_HEADERS: usize = 64;

/// One opening handshake: what the client offers, and what the answer must then say.
///
/// Build it, send [`ClientHandshake::encode`], then call [`ClientHandshake::parse_response`]
/// with everything read so far until it returns `Some`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHandshake {
    target: String,
    host: String,
    key: String,
    protocols: Option<String>,
    extensions: Option<String>,
    headers: Vec<(String, String)>,
}

/// The server's answer to the upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `101` with the right `Sec-WebSocket-Accept`: frames start right after the head.
    Accepted {
        /// The subprotocol the server chose (one the client offered).
        protocol: Option<String>,
        /// The `Sec-WebSocket-Extensions` the server accepted (only extensions the client
        /// offered).
        extensions: Option<String>,
    },
    /// Any other status: a plain HTTP response, and the connection never upgrades.
    Refused {
        status: u16,
        /// The status line, from its parsed parts (`HTTP/1.1 429 Too Many Requests`).
        status_line: String,
        /// Each header as (name, value), in order.
        headers: Vec<(String, String)>,
        /// The body bytes read so far (the caller may read on for the rest).
        body: Vec<u8>,
    },
}

impl ClientHandshake {
    /// A handshake for `target` (path and query) on `host` (`name[:port]`). `nonce` becomes
    /// the `Sec-WebSocket-Key`: RFC 6455 §4.1 asks for 16 random bytes per connection (the
    /// caller picks them: the core reads no randomness).
    #[must_use]
    pub fn new(target: &str, host: &str, nonce: [u8; 16]) -> Self {
        Self {
            target: target.to_owned(),
            host: host.to_owned(),
            key: BASE64.encode(nonce),
            protocols: None,
            extensions: None,
            headers: Vec::new(),
        }
    }

    /// Offers subprotocols (`Sec-WebSocket-Protocol`, comma-separated).
    #[must_use]
    pub fn protocols(mut self, offer: &str) -> Self {
        self.protocols = Some(offer.to_owned());
        self
    }

    /// Offers extensions (`Sec-WebSocket-Extensions`, e.g. `permessage-deflate`).
    #[must_use]
    pub fn extensions(mut self, offer: &str) -> Self {
        self.extensions = Some(offer.to_owned());
        self
    }

    /// Adds a header line (`Authorization`, `Origin`, ...).
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The `Sec-WebSocket-Key` sent.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The complete upgrade request.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
            self.target, self.host, self.key
        );
        let offers = [
            ("Sec-WebSocket-Protocol", &self.protocols),
            ("Sec-WebSocket-Extensions", &self.extensions),
        ];
        let offers = offers
            .into_iter()
            .filter_map(|(name, value)| Some((name, value.as_deref()?)));
        let extra = self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()));
        for (name, value) in offers.chain(extra) {
            request.push_str(name);
            request.push_str(": ");
            request.push_str(value);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        request.into_bytes()
    }

    /// Reads the response head from the start of `buf`: `Ok(None)` until it is complete
    /// (call again with more bytes), then the answer and the length of the head. After an
    /// [`Answer::Accepted`], `buf[len..]` holds the first frames.
    ///
    /// # Errors
    /// A head that is not HTTP or passes [`MAX_RESPONSE_HEAD`], or a `101` that breaks a
    /// rule of RFC 6455 §4.1: the client must then fail the connection.
    pub fn parse_response(
        &self,
        buf: &[u8],
    ) -> Result<Option<(Answer, usize)>, ClientHandshakeError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        let head_len = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_RESPONSE_HEAD => len,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => return Ok(None),
            Ok(_) => {
                return Err(ClientHandshakeError::HeadTooLarge {
                    max: MAX_RESPONSE_HEAD,
                });
            }
            Err(error) => return Err(ClientHandshakeError::Malformed(error)),
        };
        let status = parsed.code.unwrap_or_default();
        let fields: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|h| {
                let value = String::from_utf8_lossy(h.value).trim_ascii().to_owned();
                (h.name.to_owned(), value)
            })
            .collect();
        if status != 101 {
            let version = parsed.version.unwrap_or(1);
            let status_line = match parsed.reason.unwrap_or_default() {
                "" => format!("HTTP/1.{version} {status}"),
                reason => format!("HTTP/1.{version} {status} {reason}"),
            };
            let answer = Answer::Refused {
                status,
                status_line,
                headers: fields,
                body: buf[head_len..].to_vec(),
            };
            return Ok(Some((answer, head_len)));
        }
        let field = |name: &str| {
            let mut values = fields
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str());
            let first = values.next()?;
            Some(values.fold(first.to_owned(), |list, v| list + ", " + v))
        };
        if !has_token(field("upgrade").as_deref(), "websocket")
            || !has_token(field("connection").as_deref(), "upgrade")
        {
            return Err(ClientHandshakeError::NotUpgraded);
        }
        if field("sec-websocket-accept").as_deref() != Some(accept_key(&self.key).as_str()) {
            return Err(ClientHandshakeError::WrongAccept);
        }
        let extensions = field("sec-websocket-extensions");
        if let Some(name) = extensions
            .iter()
            .flat_map(|list| names(list))
            .find(|name| !names(self.extensions.as_deref().unwrap_or("")).any(|o| o == *name))
        {
            return Err(ClientHandshakeError::UnofferedExtension(name.to_owned()));
        }
        let protocol = field("sec-websocket-protocol");
        if let Some(chosen) = &protocol
            && !names(self.protocols.as_deref().unwrap_or("")).any(|o| o == chosen)
        {
            return Err(ClientHandshakeError::UnofferedProtocol(chosen.clone()));
        }
        let answer = Answer::Accepted {
            protocol,
            extensions,
        };
        Ok(Some((answer, head_len)))
    }
}

/// The names in a comma-separated list of offers, without their parameters.
fn names(list: &str) -> impl Iterator<Item = &str> {
    list.split(',')
        .map(|item| item.split(';').next().unwrap_or_default().trim_ascii())
        .filter(|name| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::handshake::{HandshakeLimits, parse_request, upgrade_response};

    /// The RFC 6455 §1.3 sample: its key is base64 of these 16 bytes.
    const NONCE: [u8; 16] = *b"the sample nonce";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn accepted_head(extensions: Option<&str>) -> Vec<u8> {
        upgrade_response(ACCEPT, None, extensions)
    }

    #[test]
    fn the_request_is_one_the_server_accepts() {
        let handshake = ClientHandshake::new("/ws?token=t", "127.0.0.1:8080", NONCE)
            .extensions("permessage-deflate; client_max_window_bits")
            .protocols("chat")
            .header("Authorization", "Bearer abc")
            .header("Origin", "https://app.example");
        assert_eq!(handshake.key(), "dGhlIHNhbXBsZSBub25jZQ==");
        let bytes = handshake.encode();
        let (request, len) = parse_request(&bytes, &HandshakeLimits::default())
            .unwrap()
            .unwrap();
        assert_eq!(len, bytes.len());
        assert_eq!(request.websocket_accept().unwrap(), ACCEPT);
        assert_eq!(request.path, "/ws");
        assert_eq!(request.query_param("token"), Some("t"));
        assert_eq!(request.host.as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(request.authorization.as_deref(), Some("Bearer abc"));
        assert_eq!(request.origin.as_deref(), Some("https://app.example"));
        assert_eq!(request.sec_websocket_protocol.as_deref(), Some("chat"));
        assert_eq!(
            request.sec_websocket_extensions.as_deref(),
            Some("permessage-deflate; client_max_window_bits")
        );
    }

    #[test]
    fn accepts_split_at_every_byte_and_leaves_the_frames_after_the_head() {
        let handshake = ClientHandshake::new("/ws", "h", NONCE).extensions("permessage-deflate");
        let head = accepted_head(Some("permessage-deflate; server_no_context_takeover"));
        let mut bytes = head.clone();
        bytes.extend_from_slice(b"\x81\x02hi");
        for split in 0..head.len() {
            assert_eq!(
                handshake.parse_response(&bytes[..split]),
                Ok(None),
                "{split}"
            );
        }
        let (answer, len) = handshake.parse_response(&bytes).unwrap().unwrap();
        assert_eq!(len, head.len());
        assert_eq!(&bytes[len..], b"\x81\x02hi");
        assert_eq!(
            answer,
            Answer::Accepted {
                protocol: None,
                extensions: Some("permessage-deflate; server_no_context_takeover".into()),
            }
        );
    }

    #[test]
    fn a_wrong_or_missing_accept_key_fails() {
        let handshake = ClientHandshake::new("/ws", "h", NONCE);
        let wrong = upgrade_response("AAAAAAAAAAAAAAAAAAAAAAAAAAA=", None, None);
        assert_eq!(
            handshake.parse_response(&wrong),
            Err(ClientHandshakeError::WrongAccept)
        );
        let missing = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                        Connection: Upgrade\r\n\r\n";
        assert_eq!(
            handshake.parse_response(missing),
            Err(ClientHandshakeError::WrongAccept)
        );
        let other_key = ClientHandshake::new("/ws", "h", [7; 16]);
        assert_eq!(
            other_key.parse_response(&accepted_head(None)),
            Err(ClientHandshakeError::WrongAccept)
        );
    }

    #[test]
    fn a_101_without_upgrade_headers_fails() {
        let handshake = ClientHandshake::new("/ws", "h", NONCE);
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
        );
        assert_eq!(
            handshake.parse_response(head.as_bytes()),
            Err(ClientHandshakeError::NotUpgraded)
        );
    }

    #[test]
    fn extensions_and_protocols_not_offered_fail() {
        let plain = ClientHandshake::new("/ws", "h", NONCE);
        assert_eq!(
            plain.parse_response(&accepted_head(Some("permessage-deflate"))),
            Err(ClientHandshakeError::UnofferedExtension(
                "permessage-deflate".into()
            ))
        );
        let chosen = upgrade_response(ACCEPT, Some("mqtt"), None);
        assert_eq!(
            plain
                .clone()
                .protocols("chat, json")
                .parse_response(&chosen),
            Err(ClientHandshakeError::UnofferedProtocol("mqtt".into()))
        );
        let (answer, _) = plain
            .protocols("chat, mqtt")
            .parse_response(&chosen)
            .unwrap()
            .unwrap();
        assert!(matches!(answer, Answer::Accepted { protocol: Some(p), .. } if p == "mqtt"));
    }

    #[test]
    fn a_refusal_carries_its_status_headers_and_the_body_so_far() {
        let handshake = ClientHandshake::new("/ws", "h", NONCE);
        let response = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\n\
                         Content-Length: 40\r\n\r\n{\"code\":\"retry";
        let (answer, len) = handshake.parse_response(response).unwrap().unwrap();
        assert_eq!(&response[len..], b"{\"code\":\"retry");
        let Answer::Refused {
            status,
            status_line,
            headers,
            body,
        } = answer
        else {
            panic!("not refused: {answer:?}");
        };
        assert_eq!(status, 429);
        assert_eq!(status_line, "HTTP/1.1 429 Too Many Requests");
        assert!(headers.contains(&("Retry-After".into(), "3".into())));
        assert_eq!(body, b"{\"code\":\"retry");
    }

    #[test]
    fn garbage_and_endless_heads_fail() {
        let handshake = ClientHandshake::new("/ws", "h", NONCE);
        assert!(matches!(
            handshake.parse_response(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(ClientHandshakeError::Malformed(_))
        ));
        let mut endless = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
        endless.resize(MAX_RESPONSE_HEAD + 1, b'a');
        assert_eq!(
            handshake.parse_response(&endless),
            Err(ClientHandshakeError::HeadTooLarge {
                max: MAX_RESPONSE_HEAD
            })
        );
    }
}
