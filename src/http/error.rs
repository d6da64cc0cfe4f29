//! [`ApiError`]: every refusal the HTTP side of the port gives, before an upgrade and on
//! the API, and the one place its status, machine code, message, required header and
//! response bytes are decided. The body is always JSON `{"code":..,"message":..}`.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;

use super::push_json_str;
use crate::auth::AuthError;
use crate::limits::Refusal;
use crate::proto::error::HandshakeError;

/// Why a request was refused; one variant per rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// The request head is not HTTP the server takes, or not a valid upgrade (RFC 9112,
    /// RFC 6455 §4.2.1); the status and its required header are the rule's own.
    Handshake(HandshakeError),
    /// The request was not complete within the handshake timeout: 408.
    RequestTimeout,
    /// `Content-Length` over `--max-body-bytes`: 413.
    BodyTooLarge { max: usize },
    /// A chunked request body: 411 (only `Content-Length` bodies are read).
    LengthRequired,
    /// The path exists for other methods: 405 with `Allow` (RFC 9110 §15.5.6).
    MethodNotAllowed { allow: &'static str },
    /// No such path; an upgrade is told where the WebSocket endpoints are: 404.
    NotFound { upgrade: bool },
    /// The `Origin` is not on the allow-list: 403.
    ForbiddenOrigin(String),
    /// The token is missing or refused: 401 with `WWW-Authenticate: Bearer`.
    Unauthorized(AuthError),
    /// `/api/publish` without the API key: 401 with `WWW-Authenticate: Bearer`.
    BadApiKey,
    /// HTTP publishing is off (no `--api-key`): 403.
    PublishDisabled,
    /// The rest of the server API is off (no `--api-key`): 403.
    ApiDisabled,
    /// A query or body the endpoint cannot read: 400.
    BadRequest(String),
    /// A published channel name outside the grammar: 400.
    BadChannel(String),
    /// The identity may not read `channel`: 403.
    ReadForbidden { channel: String },
    /// Presence was asked of a channel whose namespace does not keep it: 400.
    PresenceDisabled(String),
    /// A connection limit or the accept rate was hit: 503, or 429 per address, with
    /// `Retry-After` (seconds, spread by the caller so a refused crowd does not return
    /// together).
    Busy { refusal: Refusal, retry_after: u64 },
    /// The cluster could not take or store the request: 503 with `Retry-After: 1`.
    Unavailable(Cow<'static, str>),
    /// Plain HTTP on the TLS port: 400.
    TlsRequired,
    /// A publish with `expect_seq` found `channel` at `seq`: 409, the body carrying both.
    Conflict { channel: Box<str>, seq: u64 },
}

impl ApiError {
    #[must_use]
    pub fn status(&self) -> u16 {
        match self {
            Self::Handshake(e) => e.status(),
            Self::RequestTimeout => 408,
            Self::BodyTooLarge { .. } => 413,
            Self::LengthRequired => 411,
            Self::MethodNotAllowed { .. } => 405,
            Self::NotFound { .. } => 404,
            Self::ForbiddenOrigin(_)
            | Self::PublishDisabled
            | Self::ApiDisabled
            | Self::ReadForbidden { .. } => 403,
            Self::Unauthorized(_) | Self::BadApiKey => 401,
            Self::BadRequest(_)
            | Self::BadChannel(_)
            | Self::PresenceDisabled(_)
            | Self::TlsRequired => 400,
            Self::Busy { refusal, .. } => refusal.status(),
            Self::Unavailable(_) => 503,
            Self::Conflict { .. } => 409,
        }
    }

    /// The stable machine-readable code clients branch on.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::Handshake(e) => match e {
                HandshakeError::HeadTooLarge { .. } | HandshakeError::TooManyHeaders { .. } => {
                    "headers_too_large"
                }
                HandshakeError::MethodNotGet => "method_not_allowed",
                HandshakeError::UnsupportedVersion => "unsupported_version",
                _ => "bad_request",
            },
            Self::RequestTimeout => "request_timeout",
            Self::BodyTooLarge { .. } => "too_large",
            Self::LengthRequired => "length_required",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::NotFound { .. } => "not_found",
            Self::ForbiddenOrigin(_) => "forbidden_origin",
            Self::Unauthorized(_) | Self::BadApiKey => "unauthorized",
            Self::PublishDisabled => "publish_disabled",
            Self::ApiDisabled => "api_disabled",
            Self::BadRequest(_) => "bad_request",
            Self::BadChannel(_) => "bad_channel",
            Self::ReadForbidden { .. } => "forbidden",
            Self::PresenceDisabled(_) => "presence_disabled",
            Self::Busy {
                refusal: Refusal::PerUser,
                ..
            } => "too_many_connections",
            Self::Busy { .. } => "retry_later",
            Self::Unavailable(_) => "unavailable",
            Self::TlsRequired => "tls_required",
            Self::Conflict { .. } => "conflict",
        }
    }

    /// The one header this status requires, if any.
    #[must_use]
    pub fn header(&self) -> Option<(&'static str, Cow<'static, str>)> {
        match self {
            Self::Handshake(e) => e
                .extra_headers()
                .first()
                .map(|&(name, value)| (name, value.into())),
            Self::MethodNotAllowed { allow } => Some(("Allow", (*allow).into())),
            Self::Unauthorized(_) | Self::BadApiKey => Some(("WWW-Authenticate", "Bearer".into())),
            Self::Busy { retry_after, .. } => Some(("Retry-After", retry_after.to_string().into())),
            Self::Unavailable(_) => Some(("Retry-After", "1".into())),
            _ => None,
        }
    }

    /// `{"code":..,"message":..}`: the response body, and the `error` event that ends an
    /// event stream.
    #[must_use]
    pub fn json(&self) -> String {
        let message = self.to_string();
        let mut body = Vec::with_capacity(32 + message.len());
        body.extend_from_slice(b"{\"code\":");
        push_json_str(&mut body, self.code());
        body.extend_from_slice(b",\"message\":");
        push_json_str(&mut body, &message);
        if let Self::Conflict { channel, seq } = self {
            // What the client retries from, without parsing the message.
            body.extend_from_slice(b",\"channel\":");
            push_json_str(&mut body, channel);
            body.extend_from_slice(format!(",\"seq\":{seq}").as_bytes());
        }
        body.push(b'}');
        String::from_utf8(body).expect("escaped UTF-8 stays UTF-8")
    }

    /// The complete response. `keep_alive` only where the request was read to its end and
    /// the connection may carry the next one.
    #[must_use]
    pub fn response(&self, keep_alive: bool) -> Bytes {
        let header = self.header();
        let headers: &[(&str, &str)] = match &header {
            Some((name, value)) => &[(name, value)],
            None => &[],
        };
        super::response(
            self.status(),
            "application/json",
            headers,
            self.json().as_bytes(),
            keep_alive,
        )
    }
}

/// The human message: one lowercase line, safe to show (a token is never in it).
impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Handshake(e) => e.fmt(f),
            Self::RequestTimeout => f.write_str("request not completed in time"),
            Self::BodyTooLarge { max } => write!(f, "request body is larger than {max} bytes"),
            Self::LengthRequired => {
                f.write_str("chunked request bodies are not supported; send Content-Length")
            }
            Self::MethodNotAllowed { allow } => write!(f, "use {allow}"),
            Self::NotFound { upgrade: true } => {
                f.write_str("WebSocket endpoints are /ws and /echo")
            }
            Self::NotFound { upgrade: false } => f.write_str("no such path"),
            Self::ForbiddenOrigin(reason) | Self::BadRequest(reason) | Self::BadChannel(reason) => {
                f.write_str(reason)
            }
            Self::Unauthorized(e) => e.fmt(f),
            Self::BadApiKey => {
                f.write_str("a valid API key is needed as Authorization: Bearer KEY")
            }
            Self::PublishDisabled => {
                f.write_str("HTTP publishing is off: start the server with --api-key")
            }
            Self::ApiDisabled => {
                f.write_str("the server API is off: start the server with --api-key")
            }
            Self::ReadForbidden { channel } => write!(f, "not allowed to read {channel:?}"),
            Self::PresenceDisabled(channel) => write!(f, "presence is off for {channel:?}"),
            Self::Busy { refusal, .. } => f.write_str(refusal.reason()),
            Self::Unavailable(message) => f.write_str(message),
            Self::TlsRequired => f.write_str("this port speaks TLS: use https or wss"),
            Self::Conflict { channel, seq } => {
                write!(
                    f,
                    "{channel:?} is at seq {seq}, not the expected one; not stored"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(error: &ApiError, keep_alive: bool) -> String {
        String::from_utf8(error.response(keep_alive).to_vec()).unwrap()
    }

    #[test]
    fn each_rule_maps_to_its_status_code_and_header() {
        let busy = |refusal| ApiError::Busy {
            refusal,
            retry_after: 3,
        };
        type Case = (
            ApiError,
            u16,
            &'static str,
            Option<(&'static str, &'static str)>,
        );
        let cases: [Case; 25] = [
            (
                ApiError::Handshake(HandshakeError::MissingKey),
                400,
                "bad_request",
                None,
            ),
            (
                ApiError::Handshake(HandshakeError::MethodNotGet),
                405,
                "method_not_allowed",
                Some(("Allow", "GET")),
            ),
            (
                ApiError::Handshake(HandshakeError::UnsupportedVersion),
                426,
                "unsupported_version",
                Some(("Sec-WebSocket-Version", "13")),
            ),
            (
                ApiError::Handshake(HandshakeError::TooManyHeaders { max: 100 }),
                431,
                "headers_too_large",
                None,
            ),
            (ApiError::RequestTimeout, 408, "request_timeout", None),
            (ApiError::BodyTooLarge { max: 9 }, 413, "too_large", None),
            (ApiError::LengthRequired, 411, "length_required", None),
            (
                ApiError::MethodNotAllowed { allow: "GET, HEAD" },
                405,
                "method_not_allowed",
                Some(("Allow", "GET, HEAD")),
            ),
            (
                ApiError::NotFound { upgrade: false },
                404,
                "not_found",
                None,
            ),
            (
                ApiError::ForbiddenOrigin("origin \"x\" is not allowed".into()),
                403,
                "forbidden_origin",
                None,
            ),
            (
                ApiError::Unauthorized(AuthError::Expired),
                401,
                "unauthorized",
                Some(("WWW-Authenticate", "Bearer")),
            ),
            (
                ApiError::BadApiKey,
                401,
                "unauthorized",
                Some(("WWW-Authenticate", "Bearer")),
            ),
            (ApiError::PublishDisabled, 403, "publish_disabled", None),
            (ApiError::ApiDisabled, 403, "api_disabled", None),
            (ApiError::BadRequest("x".into()), 400, "bad_request", None),
            (ApiError::BadChannel("x".into()), 400, "bad_channel", None),
            (
                ApiError::ReadForbidden {
                    channel: "c".into(),
                },
                403,
                "forbidden",
                None,
            ),
            (
                busy(Refusal::Full),
                503,
                "retry_later",
                Some(("Retry-After", "3")),
            ),
            (
                busy(Refusal::PerIp),
                429,
                "retry_later",
                Some(("Retry-After", "3")),
            ),
            (
                busy(Refusal::AcceptRate),
                503,
                "retry_later",
                Some(("Retry-After", "3")),
            ),
            (
                busy(Refusal::PerUser),
                429,
                "too_many_connections",
                Some(("Retry-After", "3")),
            ),
            (ApiError::TlsRequired, 400, "tls_required", None),
            (
                ApiError::PresenceDisabled("c".into()),
                400,
                "presence_disabled",
                None,
            ),
            (
                ApiError::Unavailable("retry".into()),
                503,
                "unavailable",
                Some(("Retry-After", "1")),
            ),
            (
                ApiError::Conflict {
                    channel: "c".into(),
                    seq: 7,
                },
                409,
                "conflict",
                None,
            ),
        ];
        for (error, status, code, header) in cases {
            assert_eq!(error.status(), status, "{error:?}");
            assert_eq!(error.code(), code, "{error:?}");
            let got = error.header();
            assert_eq!(
                got.as_ref().map(|(n, v)| (*n, v.as_ref())),
                header,
                "{error:?}"
            );
            assert!(
                crate::metrics::REJECT_STATUSES.contains(&status),
                "{status} is not counted"
            );
        }
    }

    #[test]
    fn response_is_json_with_the_status_line_and_header() {
        let r = text(
            &ApiError::Handshake(HandshakeError::UnsupportedVersion),
            false,
        );
        assert!(r.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{r}");
        assert!(r.contains("\r\nContent-Type: application/json\r\n"), "{r}");
        assert!(r.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{r}");
        assert!(r.contains("\r\nConnection: close\r\n"), "{r}");
        let body = r#"{"code":"unsupported_version","message":"unsupported websocket version, only 13 is supported"}"#;
        assert!(r.ends_with(&format!("\r\n\r\n{body}")), "{r}");
        assert!(
            r.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
            "{r}"
        );
    }

    #[test]
    fn keep_alive_is_the_callers_choice() {
        let error = ApiError::BadRequest("since must be a non-negative integer".into());
        assert!(text(&error, true).contains("\r\nConnection: keep-alive\r\n"));
        assert!(text(&error, false).contains("\r\nConnection: close\r\n"));
    }

    #[test]
    fn message_is_escaped_into_the_json() {
        let error = ApiError::ReadForbidden {
            channel: "a\"b".into(),
        };
        assert_eq!(
            error.json(),
            r#"{"code":"forbidden","message":"not allowed to read \"a\\\"b\""}"#
        );
        assert_eq!(
            ApiError::Busy {
                refusal: Refusal::PerIp,
                retry_after: 2
            }
            .to_string(),
            "too many connections from this address; retry later"
        );
    }
}
