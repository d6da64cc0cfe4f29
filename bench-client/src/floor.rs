//! `floor`: the simplest server that can do a fan-out, as the baseline of what fan-out costs
//! in the kernel. One thread, one mio loop; it answers `subscribe` with `subscribed` and
//! `publish` with `ack` (so `fanout` runs against it unchanged), and on each publish encodes
//! ONE `message` frame and hands it to every subscriber of the channel with one plain
//! `write(2)` each: no batching, no queues unless the socket is full. It pings every
//! upgraded client as Herald does by default (every 25 s, the clients spread over 512
//! phases of the interval) and reads the pongs, so an idle run measures what a heartbeat
//! costs in the kernel; it checks no pong and closes no one.

use std::collections::HashMap;
use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Args;
use herald::http::ApiError;
use herald::proto::frame::{FrameHeader, OpCode, encode_frame};
use herald::proto::handshake::{HandshakeLimits, parse_request, upgrade_response};
use herald::proto::mask::apply_mask;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::load::raise_nofile_limit;

/// `herald-bench floor`.
#[derive(Debug, Clone, Args)]
pub(crate) struct FloorArgs {
    /// Address to listen on; prints `listening on ADDR` when ready (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub(crate) listen: SocketAddr,
    /// Ping every upgraded client this often, on the phase its slot falls on (0: never).
    #[arg(long, default_value_t = 25_000, value_name = "MS")]
    pub(crate) ping_interval_ms: u64,
}

/// Herald's heartbeat phases: the clients pinged together, one group at a time.
const PHASES: usize = 512;
const PING: [u8; 2] = [0x89, 0x00];

const LISTENER: Token = Token(usize::MAX);

#[derive(Debug)]
struct Client {
    stream: TcpStream,
    inbuf: Vec<u8>,
    /// Bytes a full socket did not take; later frames queue behind them.
    pending: Vec<u8>,
    upgraded: bool,
}

#[derive(Debug, Default)]
struct Channel {
    seq: u64,
    subscribers: Vec<usize>,
}

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default, borrow)]
    channel: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Debug, Default)]
struct Floor {
    clients: Vec<Option<Client>>,
    free: Vec<usize>,
    channels: HashMap<String, Channel>,
    /// The upgraded clients of each heartbeat phase (a client's phase is its slot modulo
    /// [`PHASES`]); empty when pings are off.
    phases: Vec<Vec<usize>>,
}

/// When the next phase is pinged, and which.
struct Heartbeat {
    step: Duration,
    due: Instant,
    phase: usize,
}

/// Runs the floor server until killed.
///
/// # Errors
/// The address cannot be bound.
pub(crate) fn run(args: &FloorArgs) -> Result<()> {
    raise_nofile_limit();
    let mut poll = Poll::new()?;
    let mut listener =
        TcpListener::bind(args.listen).with_context(|| format!("binding {}", args.listen))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;
    let mut floor = Floor::default();
    let mut heartbeat = (args.ping_interval_ms > 0).then(|| {
        floor.phases = vec![Vec::new(); PHASES];
        let step = Duration::from_millis(args.ping_interval_ms) / PHASES as u32;
        Heartbeat {
            step,
            due: Instant::now() + step,
            phase: 0,
        }
    });
    let mut events = Events::with_capacity(4096);
    let mut scratch = vec![0u8; 64 * 1024];
    loop {
        let timeout = heartbeat
            .as_ref()
            .map(|beat| beat.due.saturating_duration_since(Instant::now()));
        if let Err(error) = poll.poll(&mut events, timeout) {
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error.into());
        }
        for event in &events {
            if event.token() == LISTENER {
                floor.accept(&listener, &poll)?;
                continue;
            }
            let id = event.token().0;
            if event.is_writable() {
                floor.flush(id);
            }
            if event.is_readable() || event.is_read_closed() {
                floor.read(id, &mut scratch);
            }
        }
        if let Some(beat) = heartbeat.as_mut() {
            while beat.due <= Instant::now() {
                floor.ping_phase(beat.phase);
                beat.phase = (beat.phase + 1) % PHASES;
                beat.due += beat.step;
            }
        }
    }
}

impl Floor {
    fn accept(&mut self, listener: &TcpListener, poll: &Poll) -> Result<()> {
        loop {
            let (mut stream, _) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.raw_os_error() == Some(libc::EMFILE) => {
                    eprintln!("floor: out of file descriptors");
                    return Ok(());
                }
                Err(error) => return Err(error.into()),
            };
            let id = self.free.pop().unwrap_or_else(|| {
                self.clients.push(None);
                self.clients.len() - 1
            });
            let _ = stream.set_nodelay(true);
            poll.registry().register(
                &mut stream,
                Token(id),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            self.clients[id] = Some(Client {
                stream,
                inbuf: Vec::new(),
                pending: Vec::new(),
                upgraded: false,
            });
        }
    }

    fn ping_phase(&mut self, phase: usize) {
        let clients = std::mem::take(&mut self.phases[phase]);
        for &id in &clients {
            self.write(id, &PING);
        }
        // Put the list back without the clients that closed during the writes.
        let open = &self.clients;
        self.phases[phase] = clients;
        self.phases[phase].retain(|&id| open.get(id).is_some_and(Option::is_some));
    }

    fn close(&mut self, id: usize) {
        if let Some(client) = self.clients[id].take() {
            self.free.push(id);
            if client.upgraded
                && let Some(phase) = self.phases.get_mut(id % PHASES)
                && let Some(at) = phase.iter().position(|&other| other == id)
            {
                phase.swap_remove(at);
            }
            for channel in self.channels.values_mut() {
                channel.subscribers.retain(|&sub| sub != id);
            }
        }
    }

    /// Writes `bytes` to client `id` with one write call (or queues them behind bytes a full
    /// socket did not take).
    fn write(&mut self, id: usize, bytes: &[u8]) {
        let Some(client) = self.clients[id].as_mut() else {
            return;
        };
        if !client.pending.is_empty() {
            client.pending.extend_from_slice(bytes);
            return;
        }
        match client.stream.write(bytes) {
            Ok(n) => client.pending.extend_from_slice(&bytes[n..]),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                client.pending.extend_from_slice(bytes);
            }
            Err(_) => self.close(id),
        }
    }

    fn flush(&mut self, id: usize) {
        let Some(client) = self.clients[id].as_mut() else {
            return;
        };
        while !client.pending.is_empty() {
            match client.stream.write(&client.pending) {
                Ok(n) => {
                    client.pending.drain(..n);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.close(id),
            }
        }
    }

    fn read(&mut self, id: usize, scratch: &mut [u8]) {
        loop {
            let Some(client) = self.clients[id].as_mut() else {
                return;
            };
            match client.stream.read(scratch) {
                Ok(0) => return self.close(id),
                Ok(n) => {
                    client.inbuf.extend_from_slice(&scratch[..n]);
                    // Drained: the next bytes raise a new edge, so no read to see EAGAIN.
                    if n < scratch.len() {
                        break;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(id),
            }
        }
        let Some(client) = self.clients[id].as_mut() else {
            return;
        };
        let mut inbuf = std::mem::take(&mut client.inbuf);
        let mut consumed = 0;
        if !client.upgraded {
            match parse_request(&inbuf, &HandshakeLimits::default()) {
                Ok(None) => {
                    client.inbuf = inbuf;
                    return;
                }
                Ok(Some((request, len))) => match request.websocket_accept() {
                    Ok(accept) => {
                        client.upgraded = true;
                        consumed = len;
                        if let Some(phase) = self.phases.get_mut(id % PHASES) {
                            phase.push(id);
                        }
                        self.write(id, &upgrade_response(&accept, None, None));
                    }
                    Err(error) => {
                        self.write(id, &ApiError::Handshake(error).response(false));
                        return self.close(id);
                    }
                },
                Err(_) => return self.close(id),
            }
        }
        while let Ok(Some((header, header_len))) = FrameHeader::parse(&inbuf[consumed..]) {
            let start = consumed + header_len;
            let end = start + header.payload_len as usize;
            if end > inbuf.len() {
                break;
            }
            if let Some(mask) = header.mask {
                apply_mask(&mut inbuf[start..end], mask, 0);
            }
            let payload = &inbuf[start..end];
            match header.opcode {
                OpCode::Text => self.handle_text(id, payload),
                OpCode::Ping => self.write(id, &encode_frame(OpCode::Pong, payload)),
                OpCode::Close => {
                    self.write(
                        id,
                        &encode_frame(OpCode::Close, payload.get(..2).unwrap_or_default()),
                    );
                    return self.close(id);
                }
                _ => {}
            }
            consumed = end;
        }
        inbuf.drain(..consumed);
        if let Some(client) = self.clients[id].as_mut() {
            client.inbuf = inbuf;
        }
    }

    fn handle_text(&mut self, id: usize, payload: &[u8]) {
        let Ok(request) = serde_json::from_slice::<Request<'_>>(payload) else {
            return;
        };
        let request_id = request.id.unwrap_or(0);
        let Some(name) = request.channel.as_deref() else {
            if request.kind == "ping" {
                self.write(id, &encode_frame(OpCode::Text, br#"{"type":"pong"}"#));
            }
            return;
        };
        let name_json = serde_json::to_string(name).expect("strings serialise");
        match request.kind {
            "subscribe" => {
                let channel = self.channels.entry(name.to_owned()).or_default();
                if !channel.subscribers.contains(&id) {
                    channel.subscribers.push(id);
                }
                let reply = format!(
                    r#"{{"type":"subscribed","channel":{name_json},"seq":{},"epoch":"floor","id":{request_id}}}"#,
                    channel.seq
                );
                self.write(id, &encode_frame(OpCode::Text, reply.as_bytes()));
            }
            "publish" => {
                let data = request.data.map_or("null", RawValue::get);
                let channel = self.channels.entry(name.to_owned()).or_default();
                channel.seq += 1;
                let seq = channel.seq;
                let message = format!(
                    r#"{{"type":"message","channel":{name_json},"seq":{seq},"data":{data}}}"#
                );
                // Encoded once, written to every subscriber with one write call each.
                let frame = encode_frame(OpCode::Text, message.as_bytes());
                let subscribers = std::mem::take(&mut channel.subscribers);
                for &sub in &subscribers {
                    self.write(sub, &frame);
                }
                // Put the list back without the subscribers that closed during the writes.
                let clients = &self.clients;
                if let Some(channel) = self.channels.get_mut(name) {
                    channel.subscribers = subscribers;
                    channel
                        .subscribers
                        .retain(|&sub| clients.get(sub).is_some_and(Option::is_some));
                }
                let ack = format!(r#"{{"type":"ack","id":{request_id},"seq":{seq}}}"#);
                self.write(id, &encode_frame(OpCode::Text, ack.as_bytes()));
            }
            _ => {}
        }
    }
}
