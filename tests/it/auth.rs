//! Authentication and authorization against the real binary: JWT on `/ws` (and the HTTP
//! endpoints that read channels), channel permissions from the claims, anonymous
//! defaults in `optional` mode, and the `Origin` allow-list (issue 4; reliability.md
//! groups J and S). Every hostile case asserts the exact status or close code of
//! DESIGN.md and then that the server still serves a well-behaved client.
//!
//! Tokens are minted here with `jsonwebtoken`; RSA and EC keys are generated per run with
//! `openssl genpkey` into a temporary directory (test-only keys, deleted afterwards).

use crate::support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald::proto::ClientHandshake;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use support::*;

/// The HS256 secret every HS test server uses (at least 32 bytes, as the server demands).
const SECRET: &str = "herald-test-secret-0123456789abcdef";
const CLOSE_WAIT: Duration = Duration::from_secs(3);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs_token_with(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
    encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).expect("encode HS token")
}

/// A valid HS256 token for this suite's secret.
fn hs_token(claims: &Value) -> String {
    hs_token_with(Algorithm::HS256, SECRET.as_bytes(), claims)
}

/// Claims of a user who may subscribe to `news` and `chat.*` and publish to `chat.*`.
fn user_claims() -> Value {
    json!({"sub":"u1","exp":now() + 600,"channels":["news","chat.*"],"publish":["chat.*"]})
}

fn hs_server(extra: &[&str]) -> Server {
    let mut args = vec!["--jwt-secret", SECRET];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

// ---------------------------------------------------------------------------------------
// Raw handshakes
// ---------------------------------------------------------------------------------------

/// A valid upgrade request for `path` with extra header lines.
fn ws_request(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    ws_handshake(path, headers).encode()
}

fn ws_handshake(path: &str, headers: &[(&str, &str)]) -> ClientHandshake {
    headers
        .iter()
        .fold(client_handshake(path), |h, (k, v)| h.header(k, v))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The refusal's head and JSON body; asserts the server closes the socket after it.
fn refused(addr: SocketAddr, request: &[u8]) -> (Head, Value) {
    let (mut s, head) = request_head(addr, request);
    let mut body = head.rest.clone();
    body.extend(assert_closed_within(&mut s, CLOSE_WAIT));
    let json = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "refusal {} without a JSON body ({e}): {:?}",
            head.status_line,
            lossy(&body)
        )
    });
    (head, json)
}

/// Asserts a 401 with `WWW-Authenticate: Bearer`, body code `unauthorized` and a message
/// containing one of `reasons`.
fn expect_401(addr: SocketAddr, request: &[u8], reasons: &[&str], what: &str) {
    let (head, body) = refused(addr, request);
    assert_eq!(head.status, 401, "{what}: expected 401, got {head:?}");
    assert!(
        head.header("WWW-Authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "{what}: 401 without `WWW-Authenticate: Bearer`: {head:?}"
    );
    assert_eq!(body["code"], "unauthorized", "{what}: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        reasons.iter().any(|r| message.contains(r)),
        "{what}: reason {message:?} names none of {reasons:?}"
    );
}

fn expect_status(addr: SocketAddr, request: &[u8], status: u16, what: &str) -> Value {
    let (head, body) = refused(addr, request);
    assert_eq!(
        head.status, status,
        "{what}: expected {status}, got {head:?}"
    );
    body
}

/// Completes an upgrade on `path` with `headers`; panics unless it is a 101.
fn ws_open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (TcpStream, Vec<u8>) {
    let mut s = raw_connect(addr);
    let rest = upgrade(&mut s, &ws_handshake(path, headers));
    (s, rest)
}

/// A WebSocket on `/ws` carrying `token` in the Authorization header.
fn ws_with_token(addr: SocketAddr, token: &str) -> (TcpStream, Vec<u8>) {
    ws_open(addr, "/ws", &[("Authorization", &bearer(token))])
}

fn send(s: &mut TcpStream, text: &str) {
    s.write_all(&client_text(text)).expect("send frame");
}

/// The next text frame as JSON (pings, pongs skipped; panics on close or timeout).
fn recv(s: &mut TcpStream, buf: &mut Vec<u8>) -> Value {
    loop {
        let f = read_frame(s, buf, RECV_TIMEOUT).expect("connection ended, expected a reply");
        match f.opcode {
            OP_TEXT => {
                return serde_json::from_slice(&f.payload)
                    .unwrap_or_else(|e| panic!("bad JSON {:?}: {e}", lossy(&f.payload)));
            }
            OP_PING | OP_PONG => continue,
            _ => panic!(
                "expected a text frame, got {f:?} (close code {:?})",
                f.close_code()
            ),
        }
    }
}

fn ping(s: &mut TcpStream, buf: &mut Vec<u8>) {
    send(s, r#"{"type":"ping"}"#);
    let v = recv(s, buf);
    assert_eq!(v["type"], "pong", "expected pong, got {v}");
}

/// The implicit check after every hostile case: a client with a good token connects,
/// gets a pong, and the process has not panicked.
fn still_serves(server: &mut Server, token: &str) {
    let (mut s, mut buf) = ws_with_token(server.addr(), token);
    ping(&mut s, &mut buf);
    server.assert_healthy();
}

// ---------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------

#[test]
fn missing_token_gets_401_with_www_authenticate_bearer() {
    let mut server = hs_server(&[]);
    let addr = server.addr();
    let missing = ["a token is required"];
    expect_401(addr, &ws_request("/ws", &[]), &missing, "no token");
    expect_401(
        addr,
        &ws_request("/ws?token=", &[]),
        &missing,
        "empty ?token=",
    );
    expect_401(
        addr,
        &ws_request("/ws", &[("Authorization", "Bearer ")]),
        &missing,
        "empty Bearer",
    );
    // Another scheme is not a token; neither is a cookie (S-03).
    expect_401(
        addr,
        &ws_request("/ws", &[("Authorization", "Basic dTpw")]),
        &missing,
        "Basic credentials",
    );
    let valid = hs_token(&user_claims());
    expect_401(
        addr,
        &ws_request(
            "/ws",
            &[("Cookie", &format!("token={valid}; session={valid}"))],
        ),
        &missing,
        "cookie only",
    );
    // The streaming endpoints that read channels need a token too.
    for path in ["/sse?channel=news", "/poll?channel=news&since=0&timeout=0"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        expect_401(addr, req.as_bytes(), &missing, path);
    }
    still_serves(&mut server, &valid);
}

#[test]
fn token_with_forged_signature_gets_401() {
    let mut server = hs_server(&[]);
    let addr = server.addr();
    let valid = hs_token(&user_claims());
    let parts: Vec<&str> = valid.split('.').collect();

    // The payload rewritten to grant everything, the original signature kept.
    let granted = b64(
        json!({"sub":"u1","exp":now() + 600,"channels":["*"],"publish":["*"]})
            .to_string()
            .as_bytes(),
    );
    let swapped = format!("{}.{granted}.{}", parts[0], parts[2]);
    // One signature character changed (in the middle: the last one carries padding bits).
    let mut sig: Vec<char> = parts[2].chars().collect();
    sig[10] = if sig[10] == 'A' { 'B' } else { 'A' };
    let sig: String = sig.into_iter().collect();
    let flipped = format!("{}.{}.{sig}", parts[0], parts[1]);
    // The signature of another token (same header, other payload).
    let other = hs_token(&json!({"sub":"u2","exp":now() + 600}));
    let borrowed = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        other.split('.').nth(2).unwrap()
    );
    for (what, token) in [
        ("payload swapped", &swapped),
        ("signature flipped", &flipped),
        ("signature borrowed", &borrowed),
    ] {
        expect_401(
            addr,
            &ws_request("/ws", &[("Authorization", &bearer(token))]),
            &["signature"],
            what,
        );
    }
    still_serves(&mut server, &valid);
}

#[test]
fn token_signed_with_another_secret_gets_401() {
    let mut server = hs_server(&[]);
    let other_secret = b"another-secret-of-at-least-32-bytes!!";
    let token = hs_token_with(Algorithm::HS256, other_secret, &user_claims());
    expect_401(
        server.addr(),
        &ws_request("/ws", &[("Authorization", &bearer(&token))]),
        &["signature"],
        "wrong secret",
    );
    // The right secret with another HS algorithm is refused too: the algorithm is pinned.
    let hs512 = hs_token_with(Algorithm::HS512, SECRET.as_bytes(), &user_claims());
    expect_401(
        server.addr(),
        &ws_request("/ws", &[("Authorization", &bearer(&hs512))]),
        &["algorithm"],
        "HS512 on an HS256 server",
    );
    still_serves(&mut server, &hs_token(&user_claims()));
}

#[test]
fn expired_token_gets_401() {
    // The default leeway is 5 s: a minute ago is past it.
    let mut server = hs_server(&[]);
    let expired = hs_token(&json!({"sub":"u1","exp":now() - 60,"channels":["*"]}));
    expect_401(
        server.addr(),
        &ws_request("/ws", &[("Authorization", &bearer(&expired))]),
        &["expired"],
        "exp a minute ago",
    );
    expect_401(
        server.addr(),
        &ws_request(&format!("/ws?token={expired}"), &[]),
        &["expired"],
        "expired, in the query",
    );
    still_serves(&mut server, &hs_token(&user_claims()));
}

#[test]
fn token_not_valid_yet_gets_401() {
    let mut server = hs_server(&[]);
    let early = hs_token(&json!({"sub":"u1","exp":now() + 600,"nbf":now() + 120,"channels":["*"]}));
    expect_401(
        server.addr(),
        &ws_request("/ws", &[("Authorization", &bearer(&early))]),
        &["not valid yet"],
        "nbf two minutes ahead",
    );
    still_serves(&mut server, &hs_token(&user_claims()));
}

#[test]
fn alg_none_tokens_get_401() {
    let mut server = hs_server(&[]);
    let addr = server.addr();
    let payload = b64(
        json!({"sub":"u1","exp":now() + 600,"channels":["*"],"publish":["*"]})
            .to_string()
            .as_bytes(),
    );
    let valid = hs_token(&user_claims());
    let real_sig = valid.split('.').nth(2).unwrap().to_owned();
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = b64(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes());
        for (shape, token) in [
            ("empty signature", format!("{header}.{payload}.")),
            ("no signature segment", format!("{header}.{payload}")),
            (
                "a real HS256 signature",
                format!("{header}.{payload}.{real_sig}"),
            ),
        ] {
            expect_401(
                addr,
                &ws_request("/ws", &[("Authorization", &bearer(&token))]),
                &["algorithm", "malformed"],
                &format!("alg {alg}, {shape}"),
            );
        }
    }
    still_serves(&mut server, &valid);
}

#[test]
fn malformed_tokens_get_401_never_a_crash() {
    let mut server = hs_server(&[]);
    let addr = server.addr();
    let header = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
    // Signs an arbitrary payload text with the right key, so only the payload is wrong.
    let signed = |payload: &str| -> String {
        let body = format!("{header}.{}", b64(payload.as_bytes()));
        let sig = jsonwebtoken::crypto::sign(
            body.as_bytes(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::HS256,
        )
        .expect("sign");
        format!("{body}.{sig}")
    };
    let in_a_minute = now() + 60;
    let cases: Vec<(&str, String)> = vec![
        ("one segment", "abc".into()),
        ("two segments", "abc.def".into()),
        ("four segments", "a.b.c.d".into()),
        ("not base64url", "!!!.@@@.###".into()),
        ("padding", format!("{header}=.{}=.", b64(b"{}"))),
        (
            "header not JSON",
            format!("{}.{}.x", b64(b"nope"), b64(b"{}")),
        ),
        ("no exp", signed(r#"{"sub":"u1","channels":["*"]}"#)),
        (
            "exp as a string",
            signed(&format!(r#"{{"sub":"u1","exp":"{in_a_minute}"}}"#)),
        ),
        ("exp negative", signed(r#"{"sub":"u1","exp":-1}"#)),
        (
            "exp 2^64",
            signed(r#"{"sub":"u1","exp":18446744073709551616}"#),
        ),
        ("exp 1e30", signed(r#"{"sub":"u1","exp":1e30}"#)),
        ("payload an array", signed(r#"[1,2,3]"#)),
        ("payload not JSON", signed("not json")),
        (
            "channels not a list",
            signed(&format!(
                r#"{{"sub":"u1","exp":{in_a_minute},"channels":"*"}}"#
            )),
        ),
        ("8 KiB of junk", "x".repeat(8 * 1024)),
    ];
    for (what, token) in &cases {
        let (head, _) = refused(
            addr,
            &ws_request("/ws", &[("Authorization", &bearer(token))]),
        );
        assert_eq!(head.status, 401, "{what}: expected 401, got {head:?}");
    }
    // The signing helper itself is right: it makes a token that passes.
    let good = signed(&format!(
        r#"{{"sub":"u1","exp":{in_a_minute},"channels":["*"]}}"#
    ));
    still_serves(&mut server, &good);
}

#[test]
fn token_in_the_query_is_accepted_and_never_logged() {
    let mut server = hs_server(&[]);
    let addr = server.addr();
    let token = hs_token(&user_claims());
    let (mut s, mut buf) = ws_open(addr, &format!("/ws?token={token}"), &[]);
    ping(&mut s, &mut buf);
    // Its permissions apply just as for a header token.
    send(&mut s, r#"{"type":"subscribe","channel":"news","id":1}"#);
    assert_eq!(recv(&mut s, &mut buf)["type"], "subscribed");
    // A refused query token and a refused header token are not logged either (J-11).
    let bad = hs_token_with(
        Algorithm::HS256,
        b"another-secret-of-at-least-32-bytes!!",
        &user_claims(),
    );
    expect_401(
        addr,
        &ws_request(&format!("/ws?token={bad}"), &[]),
        &["signature"],
        "bad query token",
    );
    let log = server.stderr();
    for t in [&token, &bad] {
        let sig = t.split('.').nth(2).unwrap();
        assert!(
            !log.contains(sig),
            "a token's signature appears in the server log:\n{log}"
        );
    }
    still_serves(&mut server, &token);
}

#[test]
fn weak_hmac_secret_is_refused_at_startup() {
    let bin = env!("CARGO_BIN_EXE_herald");
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            "only-16-bytes!!!",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start herald");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("herald started with a 16-byte HS256 secret instead of refusing it");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!status.success(), "exit status {status}: {text}");
    assert!(text.contains("32 bytes"), "unclear refusal: {text}");
}

// ---------------------------------------------------------------------------------------
// Public-key algorithms and algorithm confusion
// ---------------------------------------------------------------------------------------

/// A temporary directory holding an `openssl`-generated key pair; removed on drop.
struct KeyPair {
    dir: PathBuf,
    private_pem: Vec<u8>,
    public_pem: Vec<u8>,
}

impl KeyPair {
    /// `kind`: "rsa" or "ec" (P-256).
    fn generate(kind: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("herald-auth-{}-{kind}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let private = dir.join("private.pem");
        let public = dir.join("public.pem");
        let opts: &[&str] = match kind {
            "rsa" => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            "ec" => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            _ => unreachable!(),
        };
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let private_s = private.to_str().unwrap();
        let public_s = public.to_str().unwrap();
        let mut gen_args = vec!["genpkey"];
        gen_args.extend_from_slice(opts);
        gen_args.extend_from_slice(&["-out", private_s]);
        run(&gen_args);
        run(&["pkey", "-in", private_s, "-pubout", "-out", public_s]);
        Self {
            private_pem: std::fs::read(&private).unwrap(),
            public_pem: std::fs::read(&public).unwrap(),
            dir,
        }
    }

    fn public_path(&self) -> String {
        self.dir.join("public.pem").to_str().unwrap().to_owned()
    }
}

impl Drop for KeyPair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn rs256_server_refuses_hs256_token_signed_with_its_public_key() {
    let keys = KeyPair::generate("rsa");
    let mut server = Server::start(&["--jwt-public-key", &keys.public_path()]);
    let addr = server.addr();
    let claims = json!({"sub":"u1","exp":now() + 600,"channels":["*"],"publish":["*"]});
    // The classic confusion: the public key (known to everyone) used as an HMAC secret.
    let confused = hs_token_with(Algorithm::HS256, &keys.public_pem, &claims);
    expect_401(
        addr,
        &ws_request("/ws", &[("Authorization", &bearer(&confused))]),
        &["algorithm"],
        "HS256 with the RSA public key as secret",
    );
    // The same with the PEM's trailing newline removed (some libraries trim it).
    let trimmed = hs_token_with(Algorithm::HS256, keys.public_pem.trim_ascii_end(), &claims);
    expect_401(
        addr,
        &ws_request("/ws", &[("Authorization", &bearer(&trimmed))]),
        &["algorithm"],
        "HS256 with the trimmed public key as secret",
    );
    // A token signed by another RSA key.
    let stranger = KeyPair::generate("rsa");
    let foreign = encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&stranger.private_pem).expect("RSA private key"),
    )
    .unwrap();
    expect_401(
        addr,
        &ws_request("/ws", &[("Authorization", &bearer(&foreign))]),
        &["signature"],
        "RS256 signed by another key",
    );
    // The right key works.
    let good = encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&keys.private_pem).expect("RSA private key"),
    )
    .unwrap();
    still_serves(&mut server, &good);
}

#[test]
fn es256_server_accepts_only_es256_tokens_from_its_key() {
    let keys = KeyPair::generate("ec");
    let mut server = Server::start(&[
        "--jwt-alg",
        "ES256",
        "--jwt-public-key",
        &keys.public_path(),
    ]);
    let addr = server.addr();
    let claims = json!({"sub":"u1","exp":now() + 600,"channels":["*"]});
    let confused = hs_token_with(Algorithm::HS256, &keys.public_pem, &claims);
    expect_401(
        addr,
        &ws_request("/ws", &[("Authorization", &bearer(&confused))]),
        &["algorithm"],
        "HS256 with the EC public key as secret",
    );
    let stranger = KeyPair::generate("ec");
    let foreign = encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&stranger.private_pem).expect("EC private key"),
    )
    .unwrap();
    expect_401(
        addr,
        &ws_request("/ws", &[("Authorization", &bearer(&foreign))]),
        &["signature"],
        "ES256 signed by another key",
    );
    let good = encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&keys.private_pem).expect("EC private key"),
    )
    .unwrap();
    still_serves(&mut server, &good);
}

// ---------------------------------------------------------------------------------------
// Permissions
// ---------------------------------------------------------------------------------------

/// Sends `command` and returns the reply, which must be an error with code `forbidden`
/// echoing `id`.
fn expect_forbidden(s: &mut TcpStream, buf: &mut Vec<u8>, command: &str, id: u64) {
    send(s, command);
    let v = recv(s, buf);
    assert_eq!(v["type"], "error", "{command}: expected an error, got {v}");
    assert_eq!(v["code"], "forbidden", "{command}: {v}");
    assert_eq!(v["id"], id, "{command}: error does not echo id: {v}");
}

#[test]
fn subscribe_and_publish_outside_the_claims_get_forbidden_and_the_connection_stays_usable() {
    let mut server = hs_server(&[]);
    let addr = server.addr();
    let (mut a, mut abuf) = ws_with_token(addr, &hs_token(&user_claims()));
    // Not in the claims at all; a prefix pattern does not cover the bare prefix or a
    // look-alike.
    expect_forbidden(
        &mut a,
        &mut abuf,
        r#"{"type":"subscribe","channel":"private.b","id":1}"#,
        1,
    );
    expect_forbidden(
        &mut a,
        &mut abuf,
        r#"{"type":"subscribe","channel":"chat","id":2}"#,
        2,
    );
    expect_forbidden(
        &mut a,
        &mut abuf,
        r#"{"type":"subscribe","channel":"chatroom","id":3}"#,
        3,
    );
    expect_forbidden(
        &mut a,
        &mut abuf,
        r#"{"type":"subscribe","channel":"newsroom","id":4}"#,
        4,
    );
    // May read `news` but not write it.
    expect_forbidden(
        &mut a,
        &mut abuf,
        r#"{"type":"publish","channel":"news","data":1,"id":5}"#,
        5,
    );
    expect_forbidden(
        &mut a,
        &mut abuf,
        r#"{"type":"publish","channel":"private.b","data":1,"id":6}"#,
        6,
    );
    // Still open and still doing what it is allowed to.
    ping(&mut a, &mut abuf);
    send(
        &mut a,
        r#"{"type":"subscribe","channel":"chat.room","id":7}"#,
    );
    let v = recv(&mut a, &mut abuf);
    assert_eq!(
        (v["type"].as_str(), v["id"].as_u64()),
        (Some("subscribed"), Some(7)),
        "{v}"
    );
    send(&mut a, r#"{"type":"subscribe","channel":"news","id":8}"#);
    assert_eq!(recv(&mut a, &mut abuf)["type"], "subscribed");
    send(
        &mut a,
        r#"{"type":"publish","channel":"chat.room","data":"hi","id":9}"#,
    );
    let mut kinds = [recv(&mut a, &mut abuf), recv(&mut a, &mut abuf)]
        .map(|v| v["type"].as_str().unwrap_or_default().to_owned());
    kinds.sort();
    assert_eq!(kinds, ["ack", "message"], "publish to an allowed channel");

    // User B owns `private.b` and publishes there; A, refused, must see none of it (J-09).
    let b_token = hs_token(
        &json!({"sub":"b","exp":now() + 600,"channels":["private.b"],"publish":["private.b"]}),
    );
    let (mut b, mut bbuf) = ws_with_token(addr, &b_token);
    for i in 0..20 {
        send(
            &mut b,
            &format!(r#"{{"type":"publish","channel":"private.b","data":{i},"id":{i}}}"#),
        );
        assert_eq!(recv(&mut b, &mut bbuf)["type"], "ack");
    }
    ping(&mut a, &mut abuf); // the next text frame A sees is the pong: nothing of B's
    a.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut probe = [0u8; 1];
    assert!(
        matches!(std::io::Read::read(&mut a, &mut probe), Err(ref e) if is_timeout(e)),
        "A received something after the pong"
    );
    still_serves(&mut server, &b_token);
}

#[test]
fn optional_mode_gives_anonymous_clients_the_configured_permissions() {
    let mut server = hs_server(&[
        "--auth",
        "optional",
        "--anonymous-subscribe",
        "public.*",
        "--anonymous-publish",
        "public.chat",
    ]);
    let addr = server.addr();
    // No token at all: a WebSocket with the anonymous permissions.
    let (mut anon, mut buf) = ws_open(addr, "/ws", &[]);
    send(
        &mut anon,
        r#"{"type":"subscribe","channel":"public.news","id":1}"#,
    );
    assert_eq!(recv(&mut anon, &mut buf)["type"], "subscribed");
    expect_forbidden(
        &mut anon,
        &mut buf,
        r#"{"type":"subscribe","channel":"private","id":2}"#,
        2,
    );
    expect_forbidden(
        &mut anon,
        &mut buf,
        r#"{"type":"publish","channel":"public.news","data":1,"id":3}"#,
        3,
    );
    send(
        &mut anon,
        r#"{"type":"publish","channel":"public.chat","data":1,"id":4}"#,
    );
    assert_eq!(recv(&mut anon, &mut buf)["type"], "ack");
    // A token, when given, counts: its claims replace the anonymous defaults...
    let token =
        hs_token(&json!({"sub":"u1","exp":now() + 600,"channels":["private"],"publish":[]}));
    let (mut user, mut ubuf) = ws_with_token(addr, &token);
    send(
        &mut user,
        r#"{"type":"subscribe","channel":"private","id":1}"#,
    );
    assert_eq!(recv(&mut user, &mut ubuf)["type"], "subscribed");
    expect_forbidden(
        &mut user,
        &mut ubuf,
        r#"{"type":"publish","channel":"public.chat","data":1,"id":2}"#,
        2,
    );
    // ...and a bad one is refused, not downgraded to anonymous.
    let expired = hs_token(&json!({"sub":"u1","exp":now() - 60}));
    expect_401(
        addr,
        &ws_request("/ws", &[("Authorization", &bearer(&expired))]),
        &["expired"],
        "expired token in optional mode",
    );
    let forged = hs_token_with(
        Algorithm::HS256,
        b"another-secret-of-at-least-32-bytes!!",
        &user_claims(),
    );
    expect_401(
        addr,
        &ws_request(&format!("/ws?token={forged}"), &[]),
        &["signature"],
        "forged token in optional mode",
    );
    ping(&mut anon, &mut buf);
    still_serves(&mut server, &token);
}

#[test]
fn http_poll_and_sse_outside_the_claims_get_403() {
    let mut server = hs_server(&[]);
    let addr = server.addr();
    let token = hs_token(&user_claims());
    for path in [
        "/poll?channel=private.b&since=0&timeout=0",
        "/sse?channel=private.b",
    ] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        let body = expect_status(addr, req.as_bytes(), 403, path);
        assert_eq!(body["code"], "forbidden", "{path}: {body}");
    }
    still_serves(&mut server, &token);
}

// ---------------------------------------------------------------------------------------
// Origin
// ---------------------------------------------------------------------------------------

#[test]
fn foreign_origin_gets_403_and_listed_origins_get_101() {
    let mut server = hs_server(&[
        "--allowed-origins",
        "https://app.example,https://admin.example",
    ]);
    let addr = server.addr();
    let token = hs_token(&user_claims());
    let auth = bearer(&token);
    for origin in [
        "https://evil.example",
        "https://app.example.evil.example",
        "http://app.example",
        "https://app.example:8443",
        "null",
    ] {
        // A valid token does not help: cross-site WebSocket hijacking rides on exactly
        // that (S-01).
        let req = ws_request("/ws", &[("Authorization", &auth), ("Origin", origin)]);
        expect_status(addr, &req, 403, origin);
        let req = ws_request(&format!("/ws?token={token}"), &[("Origin", origin)]);
        expect_status(addr, &req, 403, origin);
    }
    // Not even a missing token gets looked at first from a foreign page.
    expect_status(
        addr,
        &ws_request("/ws", &[("Origin", "https://evil.example")]),
        403,
        "foreign origin without token",
    );
    // The event stream is a channel reader too.
    let sse = format!(
        "GET /sse?channel=news HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example\r\n\
         Authorization: {auth}\r\n\r\n"
    );
    expect_status(addr, sse.as_bytes(), 403, "sse from a foreign origin");
    for origin in ["https://app.example", "https://admin.example"] {
        let (mut s, mut buf) =
            ws_open(addr, "/ws", &[("Authorization", &auth), ("Origin", origin)]);
        ping(&mut s, &mut buf);
    }
    // Non-browser clients send no Origin and are not affected.
    still_serves(&mut server, &token);
}

// ---------------------------------------------------------------------------------------
// Expiry during a connection
// ---------------------------------------------------------------------------------------

#[test]
fn token_expiring_during_the_connection_closes_it_with_4001() {
    let mut server = hs_server(&["--jwt-leeway-ms", "0"]);
    let addr = server.addr();
    // `exp` is whole seconds: 3-4 s from now leaves the handshake time on a busy machine.
    let exp = now() + 4;
    let token = hs_token(&json!({"sub":"u1","exp":exp,"channels":["*"],"publish":["*"]}));
    let (mut s, mut buf) = ws_with_token(addr, &token);
    ping(&mut s, &mut buf);
    send(&mut s, r#"{"type":"subscribe","channel":"ticks","id":1}"#);
    assert_eq!(recv(&mut s, &mut buf)["type"], "subscribed");
    // Generous after `exp`, but well before the 25 s ping or 60 s idle timers.
    let code = raw_expect_close(&mut s, &mut buf, Duration::from_secs(15));
    let closed_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert_eq!(code, 4001, "expected close 4001 at token expiry");
    assert!(
        closed_at >= exp as f64 - 0.5,
        "closed {:.2} s before exp",
        exp as f64 - closed_at
    );
    assert!(
        closed_at <= exp as f64 + 10.0,
        "closed {:.2} s after exp",
        closed_at - exp as f64
    );
    // The close handshake completes: answer it and the server ends the TCP connection.
    let _ = s.write_all(&encode_frame(
        OP_CLOSE,
        &4001u16.to_be_bytes(),
        Some([9, 9, 9, 9]),
    ));
    assert_closed_within(&mut s, CLOSE_WAIT);
    // Once its last second is over, the same token no longer opens a connection; a
    // fresh one does.
    while now() <= exp {
        thread::sleep(Duration::from_millis(50));
    }
    expect_401(
        addr,
        &ws_request("/ws", &[("Authorization", &bearer(&token))]),
        &["expired"],
        "reconnect with the expired token",
    );
    still_serves(&mut server, &hs_token(&user_claims()));
}

/// A client told "4001: reconnect with a fresh token" that reconnects at once with the
/// same token must get 401, not a 101 followed by another 4001 (a reconnect loop for the
/// rest of the expiry second). RFC 7519 §4.1.4: the current time must be *before* `exp`.
#[test]
fn token_is_refused_at_the_handshake_from_the_moment_the_connection_closes_it() {
    let mut server = hs_server(&["--jwt-leeway-ms", "0"]);
    let addr = server.addr();
    // `exp` is whole seconds: 2-3 s from now leaves the handshake time on a busy machine.
    let exp = now() + 3;
    let token = hs_token(&json!({"sub":"u1","exp":exp,"channels":["*"]}));
    let (mut s, mut buf) = ws_with_token(addr, &token);
    ping(&mut s, &mut buf);
    assert_eq!(
        raw_expect_close(&mut s, &mut buf, Duration::from_secs(15)),
        4001
    );
    // Right after the 4001 (still within the second `exp`): the server itself has just
    // judged this token expired.
    let (mut again, head) = request_head(
        addr,
        &ws_request("/ws", &[("Authorization", &bearer(&token))]),
    );
    let mut rest = head.rest.clone();
    let code = if head.status == 101 {
        raw_expect_close(&mut again, &mut rest, Duration::from_secs(2))
    } else {
        0
    };
    assert_eq!(
        head.status, 401,
        "token the server closed with 4001 a moment ago was accepted again \
         ({}; then close {code})",
        head.status_line
    );
    still_serves(&mut server, &hs_token(&user_claims()));
}

// ---------------------------------------------------------------------------------------
// HERALD_LOG=debug
// ---------------------------------------------------------------------------------------

/// Waits (up to 5 s) for a stderr line containing every one of `parts`; returns it.
fn log_line(server: &Server, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = server.stderr();
        if let Some(line) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {parts:?} under HERALD_LOG=debug:\n{log}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// README: `HERALD_LOG=debug` shows refused handshakes (status and reason), failed
/// authentication (never the token) and WebSocket closes with their codes.
#[test]
fn debug_log_shows_refusals_auth_failures_and_close_codes_but_never_a_token() {
    let mut server = Server::start_with_env(&[("HERALD_LOG", "debug")], &["--jwt-secret", SECRET]);
    let addr = server.addr();
    let good = hs_token(&user_claims());
    let forged = hs_token_with(
        Algorithm::HS256,
        b"another-secret-of-at-least-32-bytes!!",
        &user_claims(),
    );

    // A forged token, once in the header and once in the query: 401, logged with the
    // reason only.
    expect_401(
        addr,
        &ws_request("/ws", &[("Authorization", &bearer(&forged))]),
        &["signature"],
        "forged header token",
    );
    expect_401(
        addr,
        &ws_request(&format!("/ws?token={forged}"), &[]),
        &["signature"],
        "forged query token",
    );
    log_line(&server, &["authentication failed", "signature"]);
    log_line(&server, &["refused request", "status=401", "unauthorized"]);

    // A refused handshake that is not about auth: status and reason.
    let mut bad_version =
        String::from_utf8(ws_request("/ws", &[("Authorization", &bearer(&good))])).unwrap();
    bad_version = bad_version.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let (mut s, head) = request_head(addr, bad_version.as_bytes());
    assert_eq!(head.status, 426, "{head:?}");
    assert_closed_within(&mut s, CLOSE_WAIT);
    log_line(&server, &["refused request", "status=426"]);

    // Closes with their codes: one by the server (1003 for a binary message on /ws,
    // the good token in the query), one by the client (4321).
    let (mut s, mut buf) = ws_open(addr, &format!("/ws?token={good}"), &[]);
    s.write_all(&encode_frame(OP_BINARY, b"\x01\x02", Some([1, 2, 3, 4])))
        .unwrap();
    assert_eq!(raw_expect_close(&mut s, &mut buf, RECV_TIMEOUT), 1003);
    log_line(&server, &["closing WebSocket", "code=1003"]);
    let (mut s, mut buf) = ws_with_token(addr, &good);
    ping(&mut s, &mut buf);
    s.write_all(&encode_frame(
        OP_CLOSE,
        &4321u16.to_be_bytes(),
        Some([5, 6, 7, 8]),
    ))
    .unwrap();
    assert_eq!(raw_expect_close(&mut s, &mut buf, RECV_TIMEOUT), 4321);
    log_line(&server, &["client closed WebSocket", "4321"]);

    let log = server.stderr();
    for token in [&good, &forged] {
        for (i, part) in token.split('.').enumerate() {
            assert!(
                !log.contains(part),
                "part {i} of a token appears in the debug log:\n{log}"
            );
        }
    }
    still_serves(&mut server, &good);
}
