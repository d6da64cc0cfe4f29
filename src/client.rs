//! `herald client`: an interactive terminal client for the `/ws` protocol.
//!
//! It prints every message that arrives (`< ...`) and sends what is typed: a JSON line
//! as it is, or a shortcut (`/sub CHANNEL [SINCE]`, `/unsub CHANNEL`, `/pub CHANNEL
//! JSON`, `/presence CHANNEL`, `/history CHANNEL [N]`, `/ping`, `/quit`). Blocking sockets and two threads: one reads stdin and
//! writes frames, one reads frames and prints. Framing comes from [`crate::proto`].

use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::proto::client_handshake::{Answer, ClientHandshake};
use crate::proto::frame::{FrameHeader, OpCode, encode_client_frame};
use crate::proto::pubsub::validate_channel;

/// A `ws://host:port/path?query` URL, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub target: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = match url.split_once("://") {
            Some(("ws", rest)) => rest,
            Some(("wss", _)) => return Err("wss:// is not supported by this client yet".into()),
            _ => return Err(format!("{url:?} is not a ws:// URL")),
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
            None => (authority, 80),
        };
        if host.is_empty() {
            return Err(format!("no host in {url:?}"));
        }
        Ok(Self {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
            target,
        })
    }
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

const HELP: &str = "type JSON to send it, or: /sub CHANNEL [SINCE] · /unsub CHANNEL · /pub CHANNEL JSON · /presence CHANNEL · /history CHANNEL [N] · /ping · /quit";

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
        "/pub" => match rest.split_once(' ') {
            Some((channel, data)) => channel_json(channel).map(|c| {
                format!(
                    r#"{{"type":"publish","channel":{c},"data":{},"id":{id}}}"#,
                    data.trim()
                )
            }),
            None => Err("usage: /pub CHANNEL JSON".into()),
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

/// Connects and performs the upgrade; returns the stream and any bytes read past the
/// response head.
fn connect(url: &Url, token: Option<&str>) -> Result<(TcpStream, Vec<u8>), String> {
    let mut stream = TcpStream::connect((url.host.as_str(), url.port))
        .map_err(|e| format!("cannot connect to {}:{}: {e}", url.host, url.port))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
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
        .write_all(&handshake.encode())
        .map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
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
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok((stream, buf[head_len..].to_vec()))
}

fn send(stream: &Mutex<TcpStream>, opcode: OpCode, payload: &[u8]) -> io::Result<()> {
    let frame = encode_client_frame(opcode, true, payload, mask());
    stream.lock().expect("writer lock").write_all(&frame)
}

/// Reads frames and prints them until the connection ends; answers pings and closes.
fn print_frames(
    mut reader: TcpStream,
    writer: &Mutex<TcpStream>,
    mut buf: Vec<u8>,
) -> io::Result<()> {
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
                OpCode::Ping => send(writer, OpCode::Pong, &payload)?,
                OpCode::Pong => {}
                OpCode::Close => {
                    let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
                    writeln!(
                        stdout.lock(),
                        "closed by server: {} {reason}",
                        code.unwrap_or(1005)
                    )?;
                    let _ = send(writer, OpCode::Close, &payload[..payload.len().min(2)]);
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
        let n = reader.read(&mut chunk)?;
        if n == 0 {
            writeln!(stdout.lock(), "connection closed")?;
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Runs the client until `/quit`, end of input, or the server closes.
pub fn run(url: &str, token: Option<&str>) -> Result<(), String> {
    let url = Url::parse(url)?;
    let (stream, leftover) = connect(&url, token)?;
    eprintln!(
        "connected to ws://{}:{}{} — {HELP}",
        url.host, url.port, url.target
    );
    let reader = stream.try_clone().map_err(|e| e.to_string())?;
    let writer = Arc::new(Mutex::new(stream));
    let printer_writer = writer.clone();
    let printer = std::thread::spawn(move || print_frames(reader, &printer_writer, leftover));

    let mut next_id = 0;
    for line in io::stdin().lock().lines() {
        if printer.is_finished() {
            break;
        }
        let line = line.map_err(|e| e.to_string())?;
        match interpret(&line, &mut next_id) {
            Input::Send(json) => {
                if let Err(e) = send(&writer, OpCode::Text, json.as_bytes()) {
                    eprintln!("send failed: {e}");
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
        let _ = send(&writer, OpCode::Close, &1000u16.to_be_bytes());
        std::thread::sleep(Duration::from_millis(200));
        let _ = writer.lock().expect("writer lock").shutdown(Shutdown::Both);
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
                target: "/ws?token=x".into()
            }
        );
        assert_eq!(Url::parse("ws://example").unwrap().target, "/ws");
        assert_eq!(Url::parse("ws://[::1]:9/x").unwrap().host, "::1");
        assert!(Url::parse("http://x").is_err());
        assert!(Url::parse("wss://x").unwrap_err().contains("not supported"));
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
        assert_eq!(interpret("/quit", &mut id), Input::Quit);
        assert!(matches!(interpret("/sub", &mut id), Input::Help(_)));
        assert!(matches!(interpret("/sub a b", &mut id), Input::Help(_)));
        assert!(matches!(interpret("/dance", &mut id), Input::Help(_)));
    }
}
