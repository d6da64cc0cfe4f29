//! Native TLS (`--tls-cert`/`--tls-key`): wss:// and https:// on the one listener, with a
//! test CA and leaf certificates made here with rcgen and verified by a rustls client.
//! Covers group T of the reliability catalogue (protocols and suites, ALPN, plain text
//! and garbage on the TLS port, corrupted records), certificate rotation on SIGHUP (O-08),
//! echo over TLS, fan-out over TLS and the slow-consumer budget under TLS.

use crate::support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, date_time_ymd,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

use support::*;

// ---------------------------------------------------------------------------------------
// Test PKI
// ---------------------------------------------------------------------------------------

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A leaf for `localhost` and 127.0.0.1, valid now unless `expired`.
    fn leaf(&self, expired: bool) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "herald test");
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

struct Leaf {
    der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

/// A directory of PEM files for one test, removed when dropped.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("herald-tls-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    /// Writes `leaf` as cert.pem/key.pem (replacing what was there).
    fn install(&self, leaf: &Leaf) {
        std::fs::write(self.cert(), &leaf.cert_pem).unwrap();
        std::fs::write(self.key(), &leaf.key_pem).unwrap();
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A TLS server with a fresh CA and a valid leaf, plus `extra` arguments.
fn tls_server(test: &str, extra: &[&str]) -> (Server, Ca, Leaf, Files) {
    let ca = Ca::new("Herald test CA");
    let leaf = ca.leaf(false);
    let files = Files::new(test);
    files.install(&leaf);
    let (cert, key) = (files.cert(), files.key());
    let mut args = vec!["--tls-cert", path(&cert), "--tls-key", path(&key)];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    (server, ca, leaf, files)
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// A rustls client trusting `ca` only, offering `alpn`, limited to `versions`.
fn client_config(
    ca: &CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn default_client(ca: &Ca) -> Arc<ClientConfig> {
    client_config(&ca.der(), rustls::ALL_VERSIONS, &[b"http/1.1"])
}

/// A TLS connection to `addr` that verifies the server as `name`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    tokio::time::timeout(RECV_TIMEOUT, TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// A WebSocket over TLS to `path`, verifying the server as `host`.
async fn try_wss(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
    host: &str,
    path: &str,
) -> Result<Ws, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let url = format!("wss://{host}:{}{path}", addr.port());
    let connect = tokio_tungstenite::client_async_tls_with_config(
        url.as_str(),
        tcp,
        None,
        Some(Connector::Rustls(config)),
    );
    match tokio::time::timeout(RECV_TIMEOUT, connect).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

async fn wss(addr: std::net::SocketAddr, ca: &Ca, path: &str) -> Ws {
    try_wss(addr, default_client(ca), "localhost", path)
        .await
        .unwrap_or_else(|e| panic!("wss to {addr}{path}: {e}"))
}

/// One HTTP/1.1 request over TLS with `Connection: close`; returns the whole response.
async fn https_get(addr: std::net::SocketAddr, ca: &Ca, target: &str) -> String {
    let mut tls = tls_connect(addr, default_client(ca), "localhost")
        .await
        .expect("TLS handshake");
    let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(RECV_TIMEOUT, tls.read_to_end(&mut response))
        .await
        .expect("response within 5 s")
        .expect("clean end of the response");
    String::from_utf8_lossy(&response).into_owned()
}

/// A non-final frame (tungstenite masks it on the way out, as a client must).
fn fragment(opcode: OpCode, payload: &[u8], fin: bool) -> Message {
    let header = FrameHeader {
        is_final: fin,
        opcode,
        ..FrameHeader::default()
    };
    Message::Frame(Frame::from_payload(header, payload.to_vec().into()))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------
// Echo over TLS
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn echo_over_wss_carries_text_binary_large_and_fragmented_messages() {
    // A 3 MiB message and 500 at once: /echo's limits raised, as a conformance run does.
    let (mut server, ca, _leaf, _files) = tls_server(
        "echo",
        &[
            "--echo-max-message-bytes",
            "4194304",
            "--echo-max-messages-per-second",
            "100000",
        ],
    );
    let mut ws = wss(server.addr(), &ca, "/echo").await;

    send_text(&mut ws, "hello over TLS").await;
    assert_eq!(recv_text(&mut ws).await, "hello over TLS");

    // Larger than a TLS record (16 KiB) and than the pending-ciphertext limit many times.
    let big = pseudo_random_bytes(7, 3 * 1024 * 1024 + 17);
    ws.send(Message::binary(big.clone())).await.unwrap();
    match next_event(&mut ws, Duration::from_secs(20)).await {
        Some(Event::Binary(b)) => assert!(b == big, "4 MiB binary echo differs"),
        other => panic!("expected the binary echo, got {other:?}"),
    }

    // A text message in three fragments with a ping between them.
    ws.send(fragment(OpCode::Data(Data::Text), b"frag", false))
        .await
        .unwrap();
    ws.send(Message::Ping(b"mid".to_vec().into()))
        .await
        .unwrap();
    ws.send(fragment(
        OpCode::Data(Data::Continue),
        "mented ".as_bytes(),
        false,
    ))
    .await
    .unwrap();
    ws.send(fragment(OpCode::Data(Data::Continue), "é".as_bytes(), true))
        .await
        .unwrap();
    assert_eq!(recv_text(&mut ws).await, "fragmented é");

    // Many small messages queued back to back share records.
    for i in 0..500 {
        ws.feed(Message::text(format!("m{i}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..500 {
        assert_eq!(recv_text(&mut ws).await, format!("m{i}"));
    }

    // The close handshake echoes the code, then TLS and TCP end cleanly.
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::from(4321),
        reason: "done".into(),
    })))
    .await
    .unwrap();
    assert_eq!(recv_close_code(&mut ws, RECV_TIMEOUT).await, 4321);
    match next_event(&mut ws, RECV_TIMEOUT).await {
        Some(Event::Ended(_)) | None => {}
        Some(other) => panic!("expected the end after the close, got {other:?}"),
    }
    server.assert_healthy();
}

#[tokio::test]
async fn invalid_utf8_over_wss_closes_1007_and_others_keep_going() {
    let (mut server, ca, _leaf, _files) = tls_server("utf8", &[]);
    let mut other = wss(server.addr(), &ca, "/echo").await;
    let mut ws = wss(server.addr(), &ca, "/echo").await;
    ws.send(fragment(
        OpCode::Data(Data::Text),
        &[0xce, 0xba, 0xff, 0xfe],
        true,
    ))
    .await
    .unwrap();
    assert_eq!(recv_close_code(&mut ws, RECV_TIMEOUT).await, 1007);
    send_text(&mut other, "still here").await;
    assert_eq!(recv_text(&mut other).await, "still here");
    server.assert_healthy();
}

// ---------------------------------------------------------------------------------------
// Pub/sub and HTTP over TLS
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_reaches_every_wss_subscriber_byte_for_byte() {
    let (mut server, ca, _leaf, _files) = tls_server("fanout", &[]);
    let addr = server.addr();
    let mut subs = Vec::new();
    for i in 0..50 {
        let mut ws = wss(addr, &ca, "/ws").await;
        subscribe(&mut ws, "news", i).await;
        subs.push(ws);
    }
    let mut publisher = wss(addr, &ca, "/ws").await;
    let data = r#"{"headline":"tls","n":[1,2,3]}"#;
    let mut seqs = Vec::new();
    for n in 0..20 {
        seqs.push(publish_raw(&mut publisher, "news", data, n).await);
    }
    let mut first_raw = None;
    for ws in &mut subs {
        for &seq in &seqs {
            let (got, value, raw) = recv_message(ws, "news").await;
            assert_eq!(got, seq);
            assert_eq!(value, serde_json::from_str::<Value>(data).unwrap());
            assert!(raw.contains(data), "data not byte for byte: {raw}");
            first_raw.get_or_insert(raw);
        }
    }
    server.assert_healthy();
}

#[tokio::test]
async fn https_serves_the_http_endpoints() {
    let (mut server, ca, _leaf, _files) = tls_server("https", &[]);
    let health = https_get(server.addr(), &ca, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let metrics = https_get(server.addr(), &ca, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("herald_connections"), "{metrics}");
    server.assert_healthy();
}

// ---------------------------------------------------------------------------------------
// Protocols, suites, ALPN (T-01, T-02)
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn tls12_and_tls13_negotiate_ecdhe_aead_suites_and_alpn_http11() {
    let (mut server, ca, _leaf, _files) = tls_server("versions", &[]);
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let config = client_config(&ca.der(), &[version], &[b"http/1.1"]);
        let tls = tls_connect(server.addr(), config, "localhost")
            .await
            .unwrap_or_else(|e| panic!("{version:?}: {e}"));
        let session = tls.get_ref().1;
        assert_eq!(session.protocol_version(), Some(version.version));
        let suite = format!("{:?}", session.negotiated_cipher_suite().unwrap().suite());
        assert!(
            suite.starts_with("TLS13_") || suite.starts_with("TLS_ECDHE_"),
            "{suite}"
        );
        assert!(suite.contains("GCM") || suite.contains("CHACHA20_POLY1305"));
        assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]));
    }
    // A client that speaks only h2 gets no h2: the handshake fails with an alert.
    let h2_only = client_config(&ca.der(), rustls::ALL_VERSIONS, &[b"h2"]);
    let mut tls = match tls_connect(server.addr(), h2_only, "localhost").await {
        Err(e) => {
            assert!(e.to_string().contains("NoApplicationProtocol"), "{e}");
            server.assert_healthy();
            return;
        }
        Ok(tls) => tls,
    };
    // TLS 1.3 clients finish their side before reading the server's alert.
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(RECV_TIMEOUT, tls.read(&mut byte))
        .await
        .unwrap();
    assert!(read.is_err(), "h2-only client was served: {read:?}");
    server.assert_healthy();
}

#[tokio::test]
async fn plain_http_to_the_tls_port_gets_400_and_others_are_undisturbed() {
    let (mut server, ca, _leaf, _files) = tls_server("plaintext", &[]);
    let mut ws = wss(server.addr(), &ca, "/echo").await;
    let (mut s, head) = request_head(
        server.addr(),
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    );
    assert_eq!(head.status, 400, "{head:?}");
    assert!(lossy(&head.rest).contains("tls_required"), "{head:?}");
    assert_closed_within(&mut s, Duration::from_secs(1));
    send_text(&mut ws, "undisturbed").await;
    assert_eq!(recv_text(&mut ws).await, "undisturbed");
    server.assert_healthy();
}

#[tokio::test]
async fn random_bytes_and_corrupt_records_are_closed_within_a_second() {
    let (mut server, ca, _leaf, _files) = tls_server("garbage", &[]);
    // Not TLS at all: closed without an answer.
    let mut s = raw_connect(server.addr());
    std::io::Write::write_all(&mut s, &pseudo_random_bytes(3, 4096)[1..]).unwrap();
    assert_closed_within(&mut s, Duration::from_secs(1));
    // A ClientHello too short to parse: a decode_error alert (content type 21,
    // description 50), then the end of the connection.
    let mut s = raw_connect(server.addr());
    let record = [
        0x16, 0x03, 0x01, 0x00, 0x08, 0x01, 0x00, 0x00, 0x04, 1, 2, 3, 4,
    ];
    std::io::Write::write_all(&mut s, &record).unwrap();
    let answer = assert_closed_within(&mut s, Duration::from_secs(1));
    assert_eq!(answer, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 50]);
    // A handshake record that claims a huge message: closed.
    let mut s = raw_connect(server.addr());
    let mut record = vec![0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0xff, 0xff, 0xff];
    record.extend_from_slice(&pseudo_random_bytes(5, 0x40 - 4));
    std::io::Write::write_all(&mut s, &record).unwrap();
    assert_closed_within(&mut s, Duration::from_secs(1));

    // An application-data record with one flipped byte after the handshake (T-03).
    let mut tls = tls_connect(server.addr(), default_client(&ca), "localhost")
        .await
        .unwrap();
    let (tcp, _) = tls.get_mut();
    let mut bogus = vec![0x17, 0x03, 0x03, 0x00, 0x20];
    bogus.extend_from_slice(&pseudo_random_bytes(9, 0x20));
    tcp.write_all(&bogus).await.unwrap();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(1), tcp.read_to_end(&mut rest)).await;
    assert!(
        end.is_ok(),
        "connection not closed within 1 s after a bad record"
    );

    let mut ws = wss(server.addr(), &ca, "/echo").await;
    send_text(&mut ws, "fine").await;
    assert_eq!(recv_text(&mut ws).await, "fine");
    server.assert_healthy();
}

#[tokio::test]
async fn a_stalled_handshake_is_closed_by_the_handshake_timeout() {
    let (mut server, _ca, _leaf, _files) = tls_server("stall", &["--handshake-timeout-ms", "600"]);
    let started = Instant::now();
    let mut s = raw_connect(server.addr());
    // The start of a ClientHello, then silence.
    std::io::Write::write_all(&mut s, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    assert_closed_within(&mut s, Duration::from_secs(3));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(500), "closed after {took:?}");
    // Silence from the first byte is bounded the same way.
    let started = Instant::now();
    let mut s = raw_connect(server.addr());
    assert_closed_within(&mut s, Duration::from_secs(3));
    assert!(started.elapsed() >= Duration::from_millis(500));
    server.assert_healthy();
}

// ---------------------------------------------------------------------------------------
// Certificates the client refuses
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_expired_certificate_is_refused_by_the_client() {
    let ca = Ca::new("Herald test CA");
    let files = Files::new("expired");
    files.install(&ca.leaf(true));
    let (cert, key) = (files.cert(), files.key());
    let mut server = Server::start(&["--tls-cert", path(&cert), "--tls-key", path(&key)]);
    let err = try_wss(server.addr(), default_client(&ca), "localhost", "/echo")
        .await
        .expect_err("an expired certificate was accepted");
    assert!(err.contains("certificate expired"), "{err}");
    server.assert_healthy();
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_by_the_client() {
    let (mut server, ca, _leaf, _files) = tls_server("mismatch", &[]);
    let err = try_wss(
        server.addr(),
        default_client(&ca),
        "herald.example",
        "/echo",
    )
    .await
    .expect_err("a certificate for localhost was accepted for herald.example");
    assert!(err.contains("not valid for name"), "{err}");
    // An unknown CA is refused too; the right name and CA work.
    let stranger = Ca::new("Someone else");
    let err = try_wss(
        server.addr(),
        default_client(&stranger),
        "localhost",
        "/echo",
    )
    .await
    .expect_err("a certificate from an unknown CA was accepted");
    assert!(err.contains("UnknownIssuer"), "{err}");
    wss(server.addr(), &ca, "/echo").await;
    server.assert_healthy();
}

// ---------------------------------------------------------------------------------------
// Rotation (O-08)
// ---------------------------------------------------------------------------------------

async fn peer_leaf(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
) -> CertificateDer<'static> {
    let tls = tls_connect(addr, config, "localhost")
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_open_connections_survive() {
    let (mut server, ca, old_leaf, files) = tls_server("reload", &[]);
    let addr = server.addr();
    let mut open = wss(addr, &ca, "/echo").await;
    assert_eq!(peer_leaf(addr, default_client(&ca)).await, old_leaf.der);

    let new_ca = Ca::new("Herald rotated CA");
    let new_leaf = new_ca.leaf(false);
    files.install(&new_leaf);
    server.signal("HUP");
    // The swap happens on the signal thread: new handshakes see it within moments.
    let deadline = Instant::now() + RECV_TIMEOUT;
    while peer_leaf_or_none(addr, &new_ca).await.as_ref() != Some(&new_leaf.der) {
        assert!(Instant::now() < deadline, "no new certificate after SIGHUP");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The log line follows the swap and reaches us through a pipe.
    while !server.stderr().contains("certificate reloaded") {
        assert!(Instant::now() < deadline, "no log line for the reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The old CA no longer verifies new handshakes; the connection opened before still works.
    assert!(
        try_wss(addr, default_client(&ca), "localhost", "/echo")
            .await
            .is_err()
    );
    send_text(&mut open, "after reload").await;
    assert_eq!(recv_text(&mut open).await, "after reload");

    // A broken file is refused with an error and the current certificate stays.
    std::fs::write(files.cert(), "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    server.signal("HUP");
    let deadline = Instant::now() + RECV_TIMEOUT;
    while !server.stderr().contains("reload failed") {
        assert!(
            Instant::now() < deadline,
            "no error logged for a broken certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(peer_leaf(addr, default_client(&new_ca)).await, new_leaf.der);
    send_text(&mut open, "still open").await;
    assert_eq!(recv_text(&mut open).await, "still open");
    server.assert_healthy();
}

async fn peer_leaf_or_none(addr: std::net::SocketAddr, ca: &Ca) -> Option<CertificateDer<'static>> {
    let tls = tls_connect(addr, default_client(ca), "localhost")
        .await
        .ok()?;
    Some(tls.get_ref().1.peer_certificates()?[0].clone())
}

#[test]
fn a_missing_or_bad_certificate_stops_the_start_with_a_clear_error() {
    let files = Files::new("badstart");
    std::fs::write(files.cert(), "not a certificate").unwrap();
    std::fs::write(files.key(), "not a key").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(files.cert())
        .arg("--tls-key")
        .arg(files.key())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no certificate in"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "/nonexistent/cert.pem",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "--tls-cert without --tls-key started"
    );
}

// ---------------------------------------------------------------------------------------
// Flow control under TLS
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wss_subscriber_that_never_reads_is_cut_off_while_another_gets_everything() {
    // Small messages in small windows, so the outbox never passes its budget within one
    // loop turn: only bytes that pile up behind a full socket can, which is what the TLS
    // layer must leave in the outbox for the shard to see.
    const MESSAGES: u64 = 8000;
    const WINDOW: u64 = 16;
    let (mut server, ca, _leaf, _files) = tls_server(
        "slow",
        &[
            "--outbound-queue-bytes",
            "262144",
            "--max-messages-per-second",
            "1000000",
            "--history-size",
            "1",
        ],
    );
    let addr = server.addr();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let url = format!("wss://localhost:{}/ws", addr.port());
    let (mut slow, _) = tokio_tungstenite::client_async_tls_with_config(
        url.as_str(),
        tcp,
        None,
        Some(Connector::Rustls(default_client(&ca))),
    )
    .await
    .unwrap();
    subscribe(&mut slow, "bulk", 1).await;
    let mut fast = wss(addr, &ca, "/ws").await;
    subscribe(&mut fast, "bulk", 2).await;
    let mut publisher = wss(addr, &ca, "/ws").await;
    let filler = "x".repeat(1024);
    for window in 0..MESSAGES / WINDOW {
        for i in 0..WINDOW {
            let id = window * WINDOW + i;
            let text =
                format!(r#"{{"type":"publish","channel":"bulk","data":"{filler}","id":{id}}}"#);
            publisher.feed(Message::text(text)).await.unwrap();
        }
        publisher.flush().await.unwrap();
        for _ in 0..WINDOW {
            let v = recv_json(&mut publisher).await;
            assert_eq!(v["type"], "ack", "{v}");
        }
        // The reading subscriber takes each window before the next is published, so
        // only the one that never reads can fall behind, however busy the machine.
        for i in 0..WINDOW {
            let (seq, _, _) = recv_message(&mut fast, "bulk").await;
            assert_eq!(seq, window * WINDOW + i + 1);
        }
    }
    // 8 MB for the one that never read: far past its 256 KiB budget plus what the kernel
    // and the TLS session hold.
    let metrics = https_get(addr, &ca, "/metrics").await;
    assert_eq!(
        metric(&metrics, "herald_slow_consumer_closes_total"),
        1.0,
        "the non-reading subscriber was not cut off (alone)"
    );
    drop(slow);
    server.assert_healthy();
}

#[tokio::test]
async fn the_environment_variables_turn_tls_on() {
    use std::io::BufRead as _;
    let ca = Ca::new("Herald test CA");
    let files = Files::new("env");
    files.install(&ca.leaf(false));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--threads", "1"])
        .env("HERALD_TLS_CERT", files.cert())
        .env("HERALD_TLS_KEY", files.key())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();
    let served = try_wss(addr, default_client(&ca), "localhost", "/echo").await;
    let _ = child.kill();
    let _ = child.wait();
    served.expect("wss with HERALD_TLS_CERT/HERALD_TLS_KEY");
}

#[tokio::test]
async fn sigterm_closes_wss_clients_with_1001_and_exits() {
    let (mut server, ca, _leaf, _files) = tls_server("drain", &["--drain-ms", "3000"]);
    let mut clients = Vec::new();
    for path in ["/ws", "/echo"] {
        clients.push(wss(server.addr(), &ca, path).await);
    }
    server.signal("TERM");
    for ws in &mut clients {
        assert_eq!(recv_close_code(ws, RECV_TIMEOUT).await, 1001);
    }
    drop(clients);
    let status = server
        .wait_exit(Duration::from_secs(5))
        .expect("herald still running 5 s after SIGTERM");
    assert!(status.success(), "{status}");
}

// ---------------------------------------------------------------------------------------
// Key formats
// ---------------------------------------------------------------------------------------

/// Runs `openssl` with `args`, `input` on stdin; returns stdout (panics on failure).
fn openssl(args: &[&str], input: &str) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is needed to write PKCS#1 and SEC1 keys (Debian package openssl)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// README: the key may be PKCS#8, PKCS#1 or SEC1. An RSA leaf with its key as PKCS#1
/// (`BEGIN RSA PRIVATE KEY`) and a P-256 leaf with its key as SEC1 (`BEGIN EC PRIVATE
/// KEY`) each serve https with that certificate.
#[tokio::test]
async fn tls_keys_in_pkcs1_and_sec1_pem_load_and_serve() {
    let ca = Ca::new("Herald key-format CA");
    let rsa_pkcs8 = openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
        "",
    );
    let rsa = KeyPair::from_pem_and_sign_algo(&rsa_pkcs8, &rcgen::PKCS_RSA_SHA256).unwrap();
    let ec = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    for (format, key, marker) in [
        ("PKCS#1", rsa, "-----BEGIN RSA PRIVATE KEY-----"),
        ("SEC1", ec, "-----BEGIN EC PRIVATE KEY-----"),
    ] {
        let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        let key_pem = openssl(&["pkey", "-traditional"], &key.serialize_pem());
        assert!(key_pem.starts_with(marker), "{format}: {key_pem}");
        let files = Files::new(&format!("keyformat-{}", &format[..4]));
        files.install(&Leaf {
            der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem,
        });
        let mut server = Server::start(&[
            "--tls-cert",
            path(&files.cert()),
            "--tls-key",
            path(&files.key()),
        ]);
        assert_eq!(
            &peer_leaf(server.addr(), default_client(&ca)).await,
            cert.der(),
            "{format}: the served certificate"
        );
        let response = https_get(server.addr(), &ca, "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{format}: {response}");
        server.assert_healthy();
    }
}

// ---------------------------------------------------------------------------------------
// Input after close_notify
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn bytes_after_close_notify_end_the_connection_and_the_shard_stays_idle() {
    // One shard: a connection that made it spin would starve every other one.
    let (mut server, ca, _leaf, _files) = tls_server("closejunk", &["--threads", "1"]);
    let addr = server.addr();
    let mut before = wss(addr, &ca, "/echo").await;

    let name = ServerName::try_from("localhost").unwrap();
    let mut client = rustls::ClientConnection::new(default_client(&ca), name).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(RECV_TIMEOUT)).unwrap();
    while client.is_handshaking() {
        client.complete_io(&mut tcp).expect("handshake");
    }
    // close_notify and 4 KiB more in one write, the tail shaped like records.
    client.send_close_notify();
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).unwrap();
    }
    for chunk in pseudo_random_bytes(11, 4096).chunks(512) {
        wire.extend_from_slice(&[0x17, 0x03, 0x03, 0x02, 0x00]);
        wire.extend_from_slice(chunk);
    }
    let cpu_before = process_cpu_time(server.pid());
    let started = Instant::now();
    std::io::Write::write_all(&mut tcp, &wire).unwrap();

    // A window long enough that a spinning shard would burn most of it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (cpu, wall) = (
        process_cpu_time(server.pid()) - cpu_before,
        started.elapsed(),
    );
    assert!(
        cpu.as_secs_f64() < 0.3 * wall.as_secs_f64(),
        "the server used {cpu:?} of CPU in {wall:?}"
    );
    // Clients of the same shard are served, those connected before and after.
    send_text(&mut before, "before").await;
    assert_eq!(recv_text(&mut before).await, "before");
    let mut after = wss(addr, &ca, "/echo").await;
    send_text(&mut after, "after").await;
    assert_eq!(recv_text(&mut after).await, "after");

    // The server answered with its own close_notify and ended the connection.
    let tail = blocking(move || assert_closed_within(&mut tcp, Duration::from_secs(2))).await;
    let mut tail = &tail[..];
    while !tail.is_empty() {
        client.read_tls(&mut tail).unwrap();
    }
    let state = client.process_new_packets().expect("a clean end, no alert");
    assert!(state.peer_has_closed(), "no close_notify from the server");
    server.assert_healthy();
}
