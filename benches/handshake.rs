//! The upgrade request: `parse_request` alone, and with `websocket_accept` (the RFC 6455
//! checks plus SHA-1 and base64), on what a browser sends and on the least a client may send
//! (what `proto::ClientHandshake` sends).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald::proto::{ClientHandshake, HandshakeLimits, parse_request};

/// A Chromium upgrade to `/ws` with a session cookie and the usual client hints.
const BROWSER: &str = "GET /ws?token=eyJhbGciOiJIUzI1NiJ9.e30.sig HTTP/1.1\r\n\
Host: push.example.com\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://app.example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Accept-Language: en-GB,en;q=0.9,de;q=0.8\r\n\
Cookie: session=8f14e45fceea167a5a36dedd4bea2543; theme=dark; _ga=GA1.2.1234567890.1700000000\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
\r\n";

fn handshake(c: &mut Criterion) {
    let limits = HandshakeLimits::default();
    // Only the fields RFC 6455 §4.1 requires, as Herald's own clients send them.
    let minimal = ClientHandshake::new("/ws", "x", *b"the sample nonce").encode();
    let mut group = c.benchmark_group("handshake");
    for (name, request) in [("browser", BROWSER.as_bytes()), ("minimal", &minimal)] {
        group.throughput(Throughput::Bytes(request.len() as u64));
        let id = format!("{name}_{}B", request.len());
        group.bench_function(BenchmarkId::new("parse_request", &id), |b| {
            b.iter(|| parse_request(black_box(request), &limits).unwrap().unwrap());
        });
        group.bench_function(BenchmarkId::new("parse_and_accept", &id), |b| {
            b.iter(|| {
                let (parsed, _) = parse_request(black_box(request), &limits).unwrap().unwrap();
                parsed.websocket_accept().unwrap()
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = handshake
}
criterion_main!(benches);
