use std::time::Duration;

use super::*;
use crate::cluster;
use crate::compression::CompressionPolicy;
use crate::hub::ChannelName;
use crate::limits::SlowConsumerPolicy;
use crate::proto::OpCode;
use crate::proto::frame::{FrameHeader, encode_client_frame};

const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

struct NoWake;

impl Wake for NoWake {
    fn wake(&self) {}
}

struct Cluster {
    shards: Vec<Shard>,
    inboxes: Vec<Inbox>,
    post: Arc<Post>,
    now: Instant,
}

#[derive(Clone, Copy)]
struct Client {
    shard: usize,
    key: usize,
}

/// A frame the server sent: opcode and payload.
type Frame = (OpCode, Vec<u8>);

impl Cluster {
    fn new(shards: usize, config: Config) -> Self {
        let mut ctx = Context::new(config, shards, SystemTime::now()).unwrap();
        ctx.epoch = "e1".into();
        Self::with_context(shards, ctx)
    }

    fn with_context(shards: usize, ctx: Context) -> Self {
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

    fn write(&mut self, client: Client, bytes: &[u8]) {
        let shard = &mut self.shards[client.shard];
        shard.read_buffer(client.key).extend_from_slice(bytes);
        shard.handle_read(client.key, self.now);
    }

    fn connect(&mut self, shard: usize, path: &str) -> Client {
        let key = self.shards[shard].accept(self.now, LOCALHOST).unwrap();
        let client = Client { shard, key };
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        self.write(client, head.as_bytes());
        let response = self.take_output(client);
        assert!(response.starts_with(b"HTTP/1.1 101"), "{response:?}");
        client
    }

    fn send(&mut self, client: Client, json: &str) {
        let frame = encode_client_frame(OpCode::Text, true, json.as_bytes(), [1, 2, 3, 4]);
        self.write(client, &frame);
    }

    /// Moves envelopes between shards until every mailbox is quiet.
    fn settle(&mut self) {
        for _ in 0..10 {
            for (shard, inbox) in self.shards.iter_mut().zip(&self.inboxes) {
                shard.handle_inbox(inbox, self.now);
                self.post.deliver(shard.id(), shard.take_outgoing());
            }
        }
    }

    /// Everything queued for `client`, as if the socket wrote it all.
    fn take_output(&mut self, client: Client) -> Vec<u8> {
        let outbox = self.shards[client.shard].outbox(client.key);
        let mut out = Vec::new();
        while !outbox.is_empty() {
            let mut slices = [std::io::IoSlice::new(&[]); 64];
            let n = outbox.io_slices(&mut slices);
            slices[..n].iter().for_each(|s| out.extend_from_slice(s));
            let len: usize = slices[..n].iter().map(|s| s.len()).sum();
            outbox.advance(len);
        }
        out
    }

    /// Like [`Cluster::take_output`], but written the way a backend writes, so the
    /// shard hears of each write; returns at most `max` bytes.
    fn write_out(&mut self, client: Client, max: usize) -> Vec<u8> {
        let shard = &mut self.shards[client.shard];
        let mut out = Vec::new();
        while out.len() < max && !shard.outbox(client.key).is_empty() {
            let mut slices = [std::io::IoSlice::new(&[]); 64];
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

    fn parse_frames(bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let (header, n) = FrameHeader::parse(rest).unwrap().unwrap();
            let end = n + header.payload_len as usize;
            frames.push((header.opcode, rest[n..end].to_vec()));
            rest = &rest[end..];
        }
        frames
    }

    fn frames(&mut self, client: Client) -> Vec<Frame> {
        let bytes = self.take_output(client);
        let mut frames = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let (header, n) = FrameHeader::parse(rest).unwrap().unwrap();
            let end = n + header.payload_len as usize;
            frames.push((header.opcode, rest[n..end].to_vec()));
            rest = &rest[end..];
        }
        frames
    }

    fn texts(&mut self, client: Client) -> Vec<String> {
        self.frames(client)
            .into_iter()
            .map(|(op, p)| {
                assert_eq!(op, OpCode::Text);
                String::from_utf8(p).unwrap()
            })
            .collect()
    }

    /// Subscribers of `channel` its home counts on each shard (one publish: counts it).
    fn home_counts(&mut self, channel: &str) -> Vec<u32> {
        let home = hub::home_of(channel, self.shards.len());
        let name: ChannelName = channel.into();
        let now = self.now;
        self.shards[home]
            .channels
            .publish(&name, b"0", now)
            .shards
            .to_vec()
    }
}

/// A channel name whose home is `shard` of `shards`.
fn homed_on(shard: usize, shards: usize) -> String {
    (0..)
        .map(|i| format!("chan{i}"))
        .find(|c| hub::home_of(c, shards) == shard)
        .unwrap()
}

fn http(cluster: &mut Cluster, shard: usize, request: &str) -> (Client, String) {
    let key = cluster.shards[shard]
        .accept(cluster.now, LOCALHOST)
        .unwrap();
    let client = Client { shard, key };
    cluster.write(client, request.as_bytes());
    cluster.settle();
    let out = cluster.take_output(client);
    (client, String::from_utf8(out).unwrap())
}

fn seq_of(text: &str) -> u64 {
    let rest = &text[text.find("\"seq\":").unwrap() + 6..];
    rest[..rest.find(',').unwrap()].parse().unwrap()
}

mod heartbeats;
mod limits;
mod pubsub;
mod replay;
mod requests;
