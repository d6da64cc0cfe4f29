//! Shards driven in memory as a backend drives them, with clients that are byte buffers:
//! no sockets, no threads, the clock moved by hand. The shard's unit tests and the
//! `broadcast` criterion bench both run on it, so what the bench measures is what the
//! tests check.

#![allow(clippy::disallowed_methods)] // a harness starts the clock it then moves by hand

use std::io::IoSlice;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::Config;
use crate::hub;
use crate::proto::OpCode;
use crate::proto::client_handshake::{Answer, ClientHandshake};
use crate::proto::frame::{FrameHeader, encode_client_frame};

use super::{Context, Inbox, Post, Shard, Wake};

/// Where every in-memory client comes from.
pub const PEER: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The mask of every client frame: any mask does, the server must unmask it.
const MASK: [u8; 4] = [1, 2, 3, 4];
/// The RFC 6455 §1.3 sample nonce (key `dGhlIHNhbXBsZSBub25jZQ==`).
pub const NONCE: [u8; 16] = *b"the sample nonce";

/// A wake-up nobody needs: the harness steps every shard itself.
struct NoWake;

impl Wake for NoWake {
    fn wake(&self) {}
}

/// One node's shards and their mailboxes.
pub struct Cluster {
    pub shards: Vec<Shard>,
    pub inboxes: Vec<Inbox>,
    pub post: Arc<Post>,
    /// The time every call is made at; tests move it.
    pub now: Instant,
}

/// A client: the shard that accepted it and its key there.
#[derive(Clone, Copy, Debug)]
pub struct Client {
    pub shard: usize,
    pub key: usize,
}

/// A frame the server sent: opcode and payload.
pub type Frame = (OpCode, Vec<u8>);

impl Cluster {
    /// `shards` shards with `config`; the node's epoch is `e1`.
    pub fn new(shards: usize, config: Config) -> Self {
        let mut ctx = Context::new(config, shards, SystemTime::now()).expect("a valid config");
        ctx.epoch = "e1".into();
        Self::with_context(shards, ctx)
    }

    pub fn with_context(shards: usize, ctx: Context) -> Self {
        let wakers = (0..shards)
            .map(|_| Arc::new(NoWake) as Arc<dyn Wake>)
            .collect();
        let (post, receivers) = Post::new(wakers);
        let ctx = Arc::new(ctx);
        let now = Instant::now();
        Self {
            shards: (0..shards)
                .map(|id| Shard::new(id, shards, ctx.clone(), now))
                .collect(),
            inboxes: receivers
                .into_iter()
                .enumerate()
                .map(|(id, rx)| Inbox::new(id, rx, post.clone()))
                .collect(),
            post,
            now,
        }
    }

    /// `bytes` arrive from `client`.
    pub fn write(&mut self, client: Client, bytes: &[u8]) {
        let shard = &mut self.shards[client.shard];
        shard.read_buffer(client.key).extend_from_slice(bytes);
        shard.handle_read(client.key, self.now);
    }

    /// A WebSocket client of `path` on `shard`, its upgrade answered and taken.
    pub fn connect(&mut self, shard: usize, path: &str) -> Client {
        self.upgrade(shard, &ClientHandshake::new(path, "x", NONCE))
            .0
    }

    /// A client on `shard` that completed `handshake`, and the extensions accepted.
    pub fn upgrade(
        &mut self,
        shard: usize,
        handshake: &ClientHandshake,
    ) -> (Client, Option<String>) {
        let key = self.shards[shard]
            .accept(self.now, PEER)
            .expect("room for a client");
        let client = Client { shard, key };
        self.write(client, &handshake.encode());
        let response = self.take_output(client);
        match handshake.parse_response(&response) {
            Ok(Some((Answer::Accepted { extensions, .. }, len))) if len == response.len() => {
                (client, extensions)
            }
            other => panic!("{other:?}: {:?}", String::from_utf8_lossy(&response)),
        }
    }

    /// `json` from `client` as one masked text frame.
    pub fn send(&mut self, client: Client, json: &str) {
        let frame = encode_client_frame(OpCode::Text, true, json.as_bytes(), MASK);
        self.write(client, &frame);
    }

    /// Moves envelopes between shards until every mailbox is quiet.
    pub fn settle(&mut self) {
        for _ in 0..10 {
            for (shard, inbox) in self.shards.iter_mut().zip(&self.inboxes) {
                shard.handle_inbox(inbox, self.now);
                self.post.deliver(shard.id(), shard.take_outgoing());
            }
        }
    }

    /// Everything queued for `client`, as if the socket wrote it all.
    pub fn take_output(&mut self, client: Client) -> Vec<u8> {
        let outbox = self.shards[client.shard].outbox(client.key);
        let mut out = Vec::new();
        while !outbox.is_empty() {
            let mut slices = [IoSlice::new(&[]); 64];
            let n = outbox.io_slices(&mut slices);
            slices[..n].iter().for_each(|s| out.extend_from_slice(s));
            let len: usize = slices[..n].iter().map(|s| s.len()).sum();
            outbox.advance(len);
        }
        out
    }

    /// Like [`Cluster::take_output`], but written the way a backend writes, so the
    /// shard hears of each write; returns at most `max` bytes.
    pub fn write_out(&mut self, client: Client, max: usize) -> Vec<u8> {
        let shard = &mut self.shards[client.shard];
        let mut out = Vec::new();
        while out.len() < max && !shard.outbox(client.key).is_empty() {
            let mut slices = [IoSlice::new(&[]); 64];
            let n = shard.outbox(client.key).io_slices(&mut slices);
            let before = out.len();
            for slice in &slices[..n] {
                let take = slice.len().min(max - out.len());
                out.extend_from_slice(&slice[..take]);
            }
            shard.handle_written(client.key, out.len() - before);
        }
        out
    }

    /// Empties every dirty connection's outbox as if its socket took all of it, and ends
    /// each shard's turn; returns the bytes "written".
    pub fn flush_all(&mut self) -> usize {
        let mut written = 0;
        for shard in &mut self.shards {
            while let Some(key) = shard.poll_dirty() {
                let outbox = shard.outbox(key);
                let len = outbox.len_bytes();
                outbox.advance(len);
                written += len;
            }
            shard.end_turn(Duration::ZERO, self.now);
        }
        written
    }

    /// The server frames in `bytes`.
    pub fn parse_frames(bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let (header, n) = FrameHeader::parse(rest)
                .expect("a valid server frame")
                .expect("a whole frame");
            let end = n + header.payload_len as usize;
            frames.push((header.opcode, rest[n..end].to_vec()));
            rest = &rest[end..];
        }
        frames
    }

    /// The frames queued for `client`, taken.
    pub fn frames(&mut self, client: Client) -> Vec<Frame> {
        Self::parse_frames(&self.take_output(client))
    }

    /// The text frames queued for `client`, taken; any other frame fails.
    pub fn texts(&mut self, client: Client) -> Vec<String> {
        self.frames(client)
            .into_iter()
            .map(|(op, p)| {
                assert_eq!(op, OpCode::Text);
                String::from_utf8(p).expect("UTF-8 text")
            })
            .collect()
    }
}

/// A channel name whose home is `shard` of `shards`.
pub fn homed_on(shard: usize, shards: usize) -> String {
    (0..)
        .map(|i| format!("chan{i}"))
        .find(|c| hub::home_of(c, shards) == shard)
        .expect("some name is homed on every shard")
}
