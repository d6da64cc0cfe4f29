//! `herald client`: an interactive terminal client for the `/ws` protocol, over `ws://`
//! or `wss://` (rustls; the system's CA bundle, or `--ca FILE`).
//!
//! It prints every message that arrives (`< ...`) and sends what is typed: a JSON line
//! as it is, or a shortcut (`/sub CHANNEL [SINCE]`, `/unsub CHANNEL`, `/pub CHANNEL
//! [=SEQ] JSON`, `/presence CHANNEL`, `/history CHANNEL [N]`, `/ping`, `/quit`). Blocking
//! sockets and two threads: one reads stdin and hands frames over, one owns the
//! connection (a TLS session cannot be split between threads): it reads in short slices,
//! prints what arrived and writes what was handed over between them. Framing comes from
//! [`crate::proto`].

use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::proto::client_handshake::{Answer, ClientHandshake};
use crate::proto::frame::{FrameHeader, OpCode, encode_client_frame};
use crate::proto::pubsub::validate_channel;

/// The CA bundle Debian (and its derivatives) keep the system's trusted roots in.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Longest a read waits before the connection's thread writes what was handed over.
const READ_SLICE: Duration = Duration::from_millis(20);

/// A `ws://` or `wss://host:port/path?query` URL, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub target: String,
    /// `wss://`: TLS.
    pub tls: bool,
}

impl Url {
    pub fn parse(url: &str) -> Result<Self, String> {
        let (rest, tls) = match url.split_once("://") {
            Some(("ws", rest)) => (rest, false),
            Some(("wss", rest)) => (rest, true),
            _ => return Err(format!("{url:?} is not a ws:// or wss:// URL")),
        };
        let (authority, target) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/ws".to_string()),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse().map_err(|_| format!("bad port in {url:?}"))?,
            ),
            None => (authority, if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(format!("no host in {url:?}"));
        }
        Ok(Self {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
            target,
            tls,
        })
    }
}

/// The connection: plain TCP, or a TLS session over it.
enum Link {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Link {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => &tls.sock,
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(tcp) => tcp.read(buf),
            Self::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(tcp) => tcp.write(buf),
            Self::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(tcp) => tcp.flush(),
            Self::Tls(tls) => tls.flush(),
        }
    }
}

/// The roots a `wss://` server's certificate must chain to: the PEM file `ca`, else the
/// system's bundle.
fn tls_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let file = ca.unwrap_or(Path::new(SYSTEM_ROOTS));
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| format!("cannot read CA certificates from {}: {e}", file.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("bad certificate in {}: {e}", file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("unusable CA certificate in {}: {e}", file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What one typed line means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A text frame to send.
    Send(String),
    Quit,
    /// Nothing to send; tell the user this.
    Help(String),
}

const HELP: &str = "type JSON to send it, or: /sub CHANNEL [SINCE] · /unsub CHANNEL · /pub CHANNEL [=SEQ] JSON · /presence CHANNEL · /history CHANNEL [N] · /ping · /quit";

/// Turns a typed line into what to send. `next_id` numbers requests so replies match.
pub fn interpret(line: &str, next_id: &mut u64) -> Input {
    let line = line.trim();
    if line.is_empty() {
        return Input::Help(String::new());
    }
    if !line.starts_with('/') {
        return Input::Send(line.to_string());
    }
    let (command, rest) = line.split_once(' ').unwrap_or((line, ""));
    let rest = rest.trim();
    *next_id += 1;
    let id = *next_id;
    let channel_json = |c: &str| -> Result<String, String> {
        validate_channel(c)?;
        Ok(format!(
            "\"{}\"",
            c.replace('\\', "\\\\").replace('"', "\\\"")
        ))
    };
    let built = match command {
        "/quit" | "/exit" => return Input::Quit,
        "/help" => return Input::Help(HELP.into()),
        "/ping" => Ok(format!(r#"{{"type":"ping","id":{id}}}"#)),
        "/sub" => {
            let mut parts = rest.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some(channel), None) => channel_json(channel)
                    .map(|c| format!(r#"{{"type":"subscribe","channel":{c},"id":{id}}}"#)),
                (Some(channel), Some(since)) => match since.parse::<u64>() {
                    Ok(since) => channel_json(channel).map(|c| {
                        format!(r#"{{"type":"subscribe","channel":{c},"since":{since},"id":{id}}}"#)
                    }),
                    Err(_) => Err(format!("since must be a number, not {since:?}")),
                },
                _ => Err("usage: /sub CHANNEL [SINCE]".into()),
            }
        }
        "/unsub" => channel_json(rest)
            .map(|c| format!(r#"{{"type":"unsubscribe","channel":{c},"id":{id}}}"#)),
        "/presence" => {
            channel_json(rest).map(|c| format!(r#"{{"type":"presence","channel":{c},"id":{id}}}"#))
        }
        // The last N messages, newest first.
        "/history" => {
            let mut parts = rest.split_whitespace();
            match (
                parts.next(),
                parts.next().map(str::parse::<u64>),
                parts.next(),
            ) {
                (Some(channel), limit, None) if !matches!(limit, Some(Err(_))) => {
                    let limit = limit.map_or(10, |l| l.unwrap_or(10));
                    channel_json(channel).map(|c| {
                        format!(
                            r#"{{"type":"history","channel":{c},"limit":{limit},"newest_first":true,"id":{id}}}"#
                        )
                    })
                }
                _ => Err("usage: /history CHANNEL [N]".into()),
            }
        }
        // `=SEQ` (no JSON starts with `=`): stored only if the channel is still at SEQ.
        "/pub" => match rest.split_once(' ') {
            Some((channel, data)) => {
                let data = data.trim();
                let expect = match data.strip_prefix('=') {
                    Some(after) => {
                        let (seq, json) = after.split_once(' ').unwrap_or((after, ""));
                        match seq.parse::<u64>() {
                            Ok(seq) if !json.trim().is_empty() => {
                                Ok((format!(r#","expect_seq":{seq}"#), json.trim()))
                            }
                            _ => Err("usage: /pub CHANNEL =SEQ JSON".to_string()),
                        }
                    }
                    None => Ok((String::new(), data)),
                };
                expect.and_then(|(expect, data)| {
                    channel_json(channel).map(|c| {
                        format!(
                            r#"{{"type":"publish","channel":{c},"data":{data}{expect},"id":{id}}}"#
                        )
                    })
                })
            }
            None => Err("usage: /pub CHANNEL [=SEQ] JSON".into()),
        },
        other => Err(format!("unknown command {other}; {HELP}")),
    };
    match built {
        Ok(json) => Input::Send(json),
        Err(message) => Input::Help(message),
    }
}

fn random_nonce() -> io::Result<[u8; 16]> {
    let mut nonce = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
    Ok(nonce)
}

fn mask() -> [u8; 4] {
    let mut key = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut key);
    }
    key
}

/// Connects (and for `wss://` starts TLS with the roots of `ca`), performs the upgrade;
/// returns the connection and any bytes read past the response head.
fn connect(url: &Url, token: Option<&str>, ca: Option<&Path>) -> Result<(Link, Vec<u8>), String> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .map_err(|e| format!("cannot connect to {}:{}: {e}", url.host, url.port))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut stream = if url.tls {
        let name = ServerName::try_from(url.host.clone()).map_err(|e| {
            format!(
                "{:?} cannot be checked against a certificate: {e}",
                url.host
            )
        })?;
        let session =
            ClientConnection::new(tls_config(ca)?, name).map_err(|e| format!("TLS setup: {e}"))?;
        Link::Tls(Box::new(StreamOwned::new(session, tcp)))
    } else {
        Link::Plain(tcp)
    };
    let nonce = random_nonce().map_err(|e| e.to_string())?;
    let host = if url.host.contains(':') {
        format!("[{}]:{}", url.host, url.port)
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let mut handshake = ClientHandshake::new(&url.target, &host, nonce);
    if let Some(token) = token {
        handshake = handshake.header("Authorization", &format!("Bearer {token}"));
    }
    stream
        .tcp()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(&handshake.encode())
        .and_then(|()| stream.flush())
        .map_err(|e| format!("handshake: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (answer, head_len) = loop {
        if let Some(parsed) = handshake
            .parse_response(&buf)
            .map_err(|e| format!("handshake: {e}"))?
        {
            break parsed;
        }
        let n = stream
            .read(&mut chunk)
            .map_err(|e| format!("handshake: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection during the handshake".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if let Answer::Refused {
        status_line, body, ..
    } = answer
    {
        let body = String::from_utf8_lossy(&body).trim().to_string();
        return Err(format!("upgrade refused: {status_line} {body}"));
    }
    stream
        .tcp()
        .set_read_timeout(Some(READ_SLICE))
        .map_err(|e| e.to_string())?;
    Ok((stream, buf[head_len..].to_vec()))
}

fn send(link: &mut Link, opcode: OpCode, payload: &[u8]) -> io::Result<()> {
    let frame = encode_client_frame(opcode, true, payload, mask());
    link.write_all(&frame)?;
    link.flush()
}

/// What the input thread hands to the connection's thread.
enum Out {
    Frame(OpCode, Vec<u8>),
    /// Close the connection now.
    Hangup,
}

/// Owns the connection: reads frames and prints them until the connection ends, answers
/// pings and closes, and writes the frames `out` hands over.
fn print_frames(mut link: Link, mut buf: Vec<u8>, out: &Receiver<Out>) -> io::Result<()> {
    let stdout = io::stdout();
    let mut message: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        while let Ok(Some((header, len))) = FrameHeader::parse(&buf) {
            let end = len + header.payload_len as usize;
            if buf.len() < end {
                break;
            }
            let payload = buf[len..end].to_vec();
            buf.drain(..end);
            match header.opcode {
                OpCode::Ping => send(&mut link, OpCode::Pong, &payload)?,
                OpCode::Pong => {}
                OpCode::Close => {
                    let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
                    writeln!(
                        stdout.lock(),
                        "closed by server: {} {reason}",
                        code.unwrap_or(1005)
                    )?;
                    let _ = send(&mut link, OpCode::Close, &payload[..payload.len().min(2)]);
                    return Ok(());
                }
                OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                    message.extend_from_slice(&payload);
                    if header.fin {
                        let mut out = stdout.lock();
                        writeln!(out, "< {}", String::from_utf8_lossy(&message))?;
                        out.flush()?;
                        message.clear();
                    }
                }
            }
        }
        loop {
            match out.try_recv() {
                Ok(Out::Frame(opcode, payload)) => send(&mut link, opcode, &payload)?,
                Ok(Out::Hangup) | Err(TryRecvError::Disconnected) => {
                    let _ = link.tcp().shutdown(Shutdown::Both);
                    return Ok(());
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        // A read slice that runs out (nothing came) is WouldBlock or TimedOut.
        let n = match link.read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            writeln!(stdout.lock(), "connection closed")?;
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Runs the client until `/quit`, end of input, or the server closes. `ca`: the PEM file
/// of the roots a `wss://` server's certificate must chain to (else the system's).
pub fn run(url: &str, token: Option<&str>, ca: Option<&Path>) -> Result<(), String> {
    let url = Url::parse(url)?;
    let (stream, leftover) = connect(&url, token, ca)?;
    let scheme = if url.tls { "wss" } else { "ws" };
    eprintln!(
        "connected to {scheme}://{}:{}{} — {HELP}",
        url.host, url.port, url.target
    );
    let (writer, out): (Sender<Out>, _) = std::sync::mpsc::channel();
    let printer = std::thread::spawn(move || print_frames(stream, leftover, &out));

    let mut next_id = 0;
    for line in io::stdin().lock().lines() {
        if printer.is_finished() {
            break;
        }
        let line = line.map_err(|e| e.to_string())?;
        match interpret(&line, &mut next_id) {
            Input::Send(json) => {
                if writer
                    .send(Out::Frame(OpCode::Text, json.into_bytes()))
                    .is_err()
                {
                    break;
                }
            }
            Input::Help(text) if text.is_empty() => {}
            Input::Help(text) => eprintln!("{text}"),
            Input::Quit => break,
        }
    }
    if !printer.is_finished() {
        // Close politely and give the server a moment to answer before hanging up.
        let _ = writer.send(Out::Frame(OpCode::Close, 1000u16.to_be_bytes().to_vec()));
        std::thread::sleep(Duration::from_millis(200));
        let _ = writer.send(Out::Hangup);
    }
    match printer.join() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the reader thread panicked".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            Url::parse("ws://127.0.0.1:8080/ws?token=x").unwrap(),
            Url {
                host: "127.0.0.1".into(),
                port: 8080,
                target: "/ws?token=x".into(),
                tls: false,
            }
        );
        assert_eq!(Url::parse("ws://example").unwrap().target, "/ws");
        assert_eq!(Url::parse("ws://[::1]:9/x").unwrap().host, "::1");
        assert!(Url::parse("http://x").is_err());
        let wss = Url::parse("wss://example").unwrap();
        assert_eq!((wss.tls, wss.port), (true, 443));
    }

    #[test]
    fn shortcuts_build_protocol_messages() {
        let mut id = 0;
        assert_eq!(
            interpret("/sub news", &mut id),
            Input::Send(r#"{"type":"subscribe","channel":"news","id":1}"#.into())
        );
        assert_eq!(
            interpret("/sub news 41", &mut id),
            Input::Send(r#"{"type":"subscribe","channel":"news","since":41,"id":2}"#.into())
        );
        assert_eq!(
            interpret(r#"/pub news {"a": 1}"#, &mut id),
            Input::Send(r#"{"type":"publish","channel":"news","data":{"a": 1},"id":3}"#.into())
        );
        assert_eq!(
            interpret("/unsub news", &mut id),
            Input::Send(r#"{"type":"unsubscribe","channel":"news","id":4}"#.into())
        );
        assert_eq!(
            interpret(r#"{"type":"ping"}"#, &mut id),
            Input::Send(r#"{"type":"ping"}"#.into())
        );
        assert_eq!(
            interpret("/presence news", &mut id),
            Input::Send(r#"{"type":"presence","channel":"news","id":5}"#.into())
        );
        assert_eq!(
            interpret("/history news 3", &mut id),
            Input::Send(
                r#"{"type":"history","channel":"news","limit":3,"newest_first":true,"id":6}"#
                    .into()
            )
        );
        assert!(matches!(
            interpret("/history news x", &mut id),
            Input::Help(_)
        ));
        assert_eq!(
            interpret("/pub n =41 7", &mut id),
            Input::Send(
                r#"{"type":"publish","channel":"n","data":7,"expect_seq":41,"id":8}"#.into()
            )
        );
        assert!(matches!(interpret("/pub n =x 7", &mut id), Input::Help(_)));
        assert!(matches!(interpret("/pub n =4", &mut id), Input::Help(_)));
        assert_eq!(interpret("/quit", &mut id), Input::Quit);
        assert!(matches!(interpret("/sub", &mut id), Input::Help(_)));
        assert!(matches!(interpret("/sub a b", &mut id), Input::Help(_)));
        assert!(matches!(interpret("/dance", &mut id), Input::Help(_)));
    }
}
