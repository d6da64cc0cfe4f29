//! Plain HTTP on the WebSocket port: the responses a request gets when it is not (or not
//! correctly) a WebSocket upgrade. Request in, response bytes out; no sockets here.

use bytes::Bytes;

use crate::proto::handshake::Request;

/// The response to a plain HTTP request (anything but `/ws` and `/echo`).
pub fn route(request: &Request) -> Bytes {
    match (request.method.as_str(), request.path.as_str()) {
        ("GET" | "HEAD", "/healthz") => response(
            200,
            "application/json",
            &[],
            br#"{"status":"ok"}"#,
            request.method == "HEAD",
        ),
        (_, "/healthz") => json_error(
            405,
            "method_not_allowed",
            "use GET",
            &[("Allow", "GET, HEAD")],
        ),
        _ if request.is_upgrade() => json_error(
            404,
            "not_found",
            "WebSocket endpoints are /ws and /echo",
            &[],
        ),
        _ => json_error(404, "not_found", "no such path", &[]),
    }
}

/// A plain-text error for a request that failed before the upgrade: the status and a
/// one-line reason, and the connection closes.
pub fn error_response(status: u16, reason: &str, extra_headers: &[(&str, &str)]) -> Bytes {
    let body = format!("{reason}\n");
    response(
        status,
        "text/plain; charset=utf-8",
        extra_headers,
        body.as_bytes(),
        false,
    )
}

fn json_error(status: u16, code: &str, message: &str, extra_headers: &[(&str, &str)]) -> Bytes {
    let body = format!(r#"{{"code":"{code}","message":"{message}"}}"#);
    response(
        status,
        "application/json",
        extra_headers,
        body.as_bytes(),
        false,
    )
}

/// A complete HTTP/1.1 response that ends the connection (`Connection: close`).
fn response(
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
    head_only: bool,
) -> Bytes {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason_phrase(status),
        body.len()
    );
    for (name, value) in extra_headers {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    Bytes::from(out)
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
        413 => "Content Too Large",
        414 => "URI Too Long",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_carries_status_reason_and_headers() {
        let r = error_response(
            426,
            "unsupported version",
            &[("Sec-WebSocket-Version", "13")],
        );
        let text = std::str::from_utf8(&r).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(text.contains("Content-Length: 20\r\n"));
        assert!(text.ends_with("\r\n\r\nunsupported version\n"));
    }
}
