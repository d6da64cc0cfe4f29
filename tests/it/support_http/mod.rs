//! A small blocking HTTP/1.1 client for Herald's HTTP side (`/api/publish`, `/poll`,
//! `/sse`, `/metrics`): one keep-alive connection, `Content-Length` bodies only (all
//! Herald sends besides event streams), every read bounded by a deadline.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One complete response.
#[derive(Debug, Clone)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Response {
    /// First value of header `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (panics with the body when it is not).
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} response body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// Asserts a JSON API error: `status`, `Content-Type: application/json`, a body
    /// `{"code":code,"message":<string>}`.
    pub(crate) fn assert_api_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status,
            status,
            "expected {status} {code}, got {} {:?}",
            self.status,
            self.text()
        );
        assert_eq!(
            self.header("Content-Type"),
            Some("application/json"),
            "API errors are JSON: {self:?}"
        );
        let v = self.json();
        assert_eq!(v["code"], code, "error code: {v}");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error without a message: {v}"
        );
    }
}

/// A client connection; bytes read past one response are kept for the next.
pub(crate) struct HttpConn {
    pub(crate) stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    pub(crate) fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        Self::from_stream(stream)
    }

    /// A client over a socket connected elsewhere (from a chosen source address, say).
    pub(crate) fn from_stream(stream: TcpStream) -> Self {
        stream.set_nodelay(true).unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    pub(crate) fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write request");
    }

    /// Sends `GET target` (keep-alive) with `extra` header lines (each ending in CRLF).
    pub(crate) fn send_get(&mut self, target: &str, extra: &str) {
        let req = format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n");
        self.send_raw(req.as_bytes());
    }

    pub(crate) fn get(&mut self, target: &str, limit: Duration) -> Response {
        self.send_get(target, "");
        self.read_response(limit)
    }

    pub(crate) fn post_publish(&mut self, key: Option<&str>, body: &str) {
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        let req = format!(
            "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.send_raw(req.as_bytes());
    }

    /// Publishes and reads the response (5 s limit).
    pub(crate) fn publish(&mut self, key: Option<&str>, body: &str) -> Response {
        self.post_publish(key, body);
        self.read_response(Duration::from_secs(5))
    }

    /// Reads until `buf` holds `want` bytes; panics on EOF or at the deadline.
    fn fill(&mut self, want: usize, deadline: Instant, what: &str) {
        let mut chunk = [0u8; 16384];
        while self.buf.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no complete {what} in time; have {:?}",
                lossy(&self.buf)
            );
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!(
                    "connection closed before a complete {what}; have {:?}",
                    lossy(&self.buf)
                ),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("no complete {what} in time; have {:?}", lossy(&self.buf))
                }
                Err(e) => panic!("read error before a complete {what}: {e}"),
            }
        }
    }

    /// Reads the head only (the body is left in the buffer); `None` on timeout.
    pub(crate) fn try_read_head(
        &mut self,
        limit: Duration,
    ) -> Option<(u16, Vec<(String, String)>)> {
        let deadline = Instant::now() + limit;
        let mut chunk = [0u8; 16384];
        let end = loop {
            if let Some(pos) = find(&self.buf, b"\r\n\r\n") {
                break pos;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!(
                    "connection closed before a complete response head; have {:?}",
                    lossy(&self.buf)
                ),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return None;
                }
                Err(e) => panic!("read error before a complete response head: {e}"),
            }
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).expect("ASCII response head");
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        assert!(
            status_line.starts_with("HTTP/1.1 "),
            "bad status line {status_line:?}"
        );
        let status = status_line[9..12]
            .parse()
            .unwrap_or_else(|_| panic!("bad status line {status_line:?}"));
        let headers = lines
            .map(|l| {
                let (k, v) = l
                    .split_once(':')
                    .unwrap_or_else(|| panic!("bad header line {l:?}"));
                (k.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        Some((status, headers))
    }

    /// Reads one whole `Content-Length` response; panics on timeout.
    pub(crate) fn read_response(&mut self, limit: Duration) -> Response {
        self.try_read_response(limit)
            .unwrap_or_else(|| panic!("no response head within {limit:?}"))
    }

    pub(crate) fn try_read_response(&mut self, limit: Duration) -> Option<Response> {
        let deadline = Instant::now() + limit;
        let (status, headers) = self.try_read_head(limit)?;
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        let len: usize = response
            .header("Content-Length")
            .unwrap_or_else(|| panic!("response without Content-Length: {response:?}"))
            .parse()
            .expect("numeric Content-Length");
        self.fill(
            len,
            deadline.max(Instant::now() + Duration::from_secs(2)),
            "body",
        );
        response.body = self.buf.drain(..len).collect();
        Some(response)
    }

    /// Reads a response to HEAD: head only, no body whatever Content-Length says.
    pub(crate) fn read_head_only(&mut self, limit: Duration) -> Response {
        let (status, headers) = self
            .try_read_head(limit)
            .unwrap_or_else(|| panic!("no response head within {limit:?}"));
        Response {
            status,
            headers,
            body: Vec::new(),
        }
    }

    /// Reads event-stream bytes until `buf` (the body after the head) holds `needle`
    /// `count` times; returns everything read so far. Panics at the deadline.
    pub(crate) fn read_stream_until(
        &mut self,
        needle: &str,
        count: usize,
        limit: Duration,
    ) -> String {
        let deadline = Instant::now() + limit;
        let mut chunk = [0u8; 16384];
        loop {
            let text = String::from_utf8_lossy(&self.buf).into_owned();
            if text.matches(needle).count() >= count {
                return text;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "stream did not show {needle:?} x{count} within {limit:?}; have {text:?}"
            );
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("stream ended; have {text:?}"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("stream read error {e}; have {text:?}"),
            }
        }
    }

    /// Drops the first `n` bytes of what was read (consumed stream events).
    pub(crate) fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
    }

    /// Whether the peer has closed (EOF within `limit`), discarding data.
    pub(crate) fn closed_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut chunk = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(512)]).into_owned()
}

/// Percent-encodes a query value (unreserved characters pass through).
pub(crate) fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One request with `key` as its bearer token (the server API), on a connection of its
/// own, run off the async runtime's threads.
pub(crate) async fn api_call(
    addr: SocketAddr,
    key: &'static str,
    method: &str,
    target: &str,
    body: &str,
) -> Response {
    let (method, target, body) = (method.to_owned(), target.to_owned(), body.to_owned());
    crate::support::blocking(move || {
        let mut conn = HttpConn::connect(addr);
        conn.send_raw(
            format!(
                "{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        conn.read_response(Duration::from_secs(5))
    })
    .await
}
