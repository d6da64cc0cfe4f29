//! The HTTP side of the one port: routing, and every response's bytes. Request in,
//! response bytes out; the shard holds the state of requests that wait (publish acks,
//! long-polls, event streams).

pub mod api;
mod assets;
mod error;
pub mod longpoll;
pub mod metrics;
pub mod publish;
pub mod sse;

use bytes::Bytes;

pub use self::error::ApiError;
use crate::proto::handshake::Request;
pub use crate::proto::pubsub::push_json_str;

/// The OpenAPI 3 document of every endpoint here, served at `GET /api/openapi.json`; the
/// file in the repository is the one source (`tests/openapi/run.sh` checks a running node
/// against it).
pub const OPENAPI: &str = include_str!("openapi.json");

/// An optional JSON member that, when written, holds a `T`: `null` is refused rather
/// than read as absent (`{"user":"a","conn":null}` is not a request for one target).
fn given<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /ws`: the pub/sub protocol.
    PubSub,
    /// `GET /echo`: WebSocket echo.
    Echo,
    /// `POST /api/publish`.
    Publish,
    /// `GET /poll?channel=C&since=N&timeout=S`.
    Poll,
    /// `GET /sse?channel=C`.
    Sse,
    /// The rest of the server API (`api`).
    Api(api::Endpoint),
    Metrics,
    Stats,
    Health,
    /// `GET /api/openapi.json`: [`OPENAPI`].
    OpenApi,
    /// A static file compiled into the binary.
    Asset {
        body: &'static [u8],
        content_type: &'static str,
    },
    MethodNotAllowed {
        allow: &'static str,
    },
    NotFound,
}

pub fn route(request: &Request) -> Route {
    let method = request.method.as_str();
    let (route, allow) = match request.path.as_str() {
        "/ws" => (Route::PubSub, "GET"),
        "/echo" => (Route::Echo, "GET"),
        "/api/publish" => (Route::Publish, "POST"),
        "/poll" => (Route::Poll, "GET"),
        "/sse" => (Route::Sse, "GET"),
        "/metrics" => (Route::Metrics, "GET, HEAD"),
        "/api/stats" => (Route::Stats, "GET, HEAD"),
        "/healthz" => (Route::Health, "GET, HEAD"),
        "/api/openapi.json" => (Route::OpenApi, "GET, HEAD"),
        path if let Some((endpoint, method)) = api::Endpoint::at(path) => {
            (Route::Api(endpoint), method)
        }
        path => match assets::find(path) {
            Some((body, content_type)) => (Route::Asset { body, content_type }, "GET, HEAD"),
            None => return Route::NotFound,
        },
    };
    let allowed = allow.split(", ").any(|m| m == method);
    // A non-GET WebSocket upgrade is the handshake's business (it answers 405 itself).
    if allowed || matches!(route, Route::PubSub | Route::Echo) {
        route
    } else {
        Route::MethodNotAllowed { allow }
    }
}

/// Whether the client wants the connection kept after this request (RFC 9112 §9.3).
pub fn keep_alive(request: &Request) -> bool {
    let has = |token: &str| {
        request
            .connection
            .as_deref()
            .is_some_and(|c| c.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if request.version_minor >= 1 {
        !has("close")
    } else {
        has("keep-alive")
    }
}

/// A complete HTTP/1.1 response with a `Content-Length` body.
pub fn response(
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
    keep_alive: bool,
) -> Bytes {
    let mut out = head(
        status,
        content_type,
        extra_headers,
        keep_alive,
        Some(body.len()),
    );
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// A response head; `content_length: None` leaves the body open (event streams).
pub fn head(
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    keep_alive: bool,
    content_length: Option<usize>,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nCache-Control: no-store\r\n",
        reason_phrase(status),
    );
    if let Some(len) = content_length {
        out.push_str(&format!("Content-Length: {len}\r\n"));
    }
    out.push_str(if keep_alive {
        "Connection: keep-alive\r\n"
    } else {
        "Connection: close\r\n"
    });
    for (name, value) in extra_headers {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Decodes `%XX` escapes (and `+` as space) in a query value; `None` if the result is not
/// UTF-8 or an escape is malformed.
pub fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::handshake::{HandshakeLimits, parse_request};

    fn request(head: &str) -> Request {
        parse_request(head.as_bytes(), &HandshakeLimits::default())
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn routes_by_path_and_method() {
        let get = |path: &str| route(&request(&format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")));
        assert_eq!(get("/healthz"), Route::Health);
        assert_eq!(get("/poll?channel=a"), Route::Poll);
        assert_eq!(get("/nope"), Route::NotFound);
        assert!(matches!(get("/"), Route::Asset { .. }));
        assert_eq!(
            get("/api/publish"),
            Route::MethodNotAllowed { allow: "POST" }
        );
        assert_eq!(
            get("/api/presence?channel=a"),
            Route::Api(api::Endpoint::Presence)
        );
        assert_eq!(
            get("/api/disconnect"),
            Route::MethodNotAllowed { allow: "POST" }
        );
        let post = request("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(route(&post), Route::MethodNotAllowed { allow: "GET, HEAD" });
    }

    /// The document names every path the router serves with the methods it takes, and no
    /// other (the WebSocket paths take GET; their handshake answers other methods 405).
    #[test]
    fn openapi_document_matches_the_router() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().unwrap();
        let routed = [
            "/",
            "/herald.js",
            "/ws",
            "/echo",
            "/api/publish",
            "/poll",
            "/sse",
            "/metrics",
            "/api/stats",
            "/healthz",
            "/api/openapi.json",
            "/api/disconnect",
            "/api/unsubscribe",
            "/api/presence",
            "/api/presence_stats",
            "/api/history",
            "/api/channels",
            "/api/info",
        ];
        let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
        documented.sort_unstable();
        let mut expected = routed.to_vec();
        expected.sort_unstable();
        assert_eq!(documented, expected);
        for (path, item) in paths {
            let mut methods: Vec<String> = item
                .as_object()
                .unwrap()
                .keys()
                .map(|m| m.to_uppercase())
                .collect();
            methods.sort_unstable_by_key(|m| m != "GET" && m != "POST");
            for method in ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
                let got = route(&request(&format!(
                    "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                )));
                let allowed = !matches!(got, Route::MethodNotAllowed { .. } | Route::NotFound);
                let upgrade = matches!(got, Route::PubSub | Route::Echo);
                assert_eq!(
                    allowed && !upgrade || upgrade && method == "GET",
                    methods.iter().any(|m| m == method),
                    "{method} {path}"
                );
                if let Route::MethodNotAllowed { allow } = got {
                    assert_eq!(allow, methods.join(", "), "{path}");
                }
            }
        }
    }

    #[test]
    fn keep_alive_follows_version_and_connection_header() {
        assert!(keep_alive(&request("GET / HTTP/1.1\r\nHost: x\r\n\r\n")));
        assert!(!keep_alive(&request(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )));
        assert!(!keep_alive(&request("GET / HTTP/1.0\r\nHost: x\r\n\r\n")));
        assert!(keep_alive(&request(
            "GET / HTTP/1.0\r\nHost: x\r\nConnection: Keep-Alive\r\n\r\n"
        )));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("chat%2Eroom+1").as_deref(),
            Some("chat.room 1")
        );
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
