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

#[test]
fn publish_reaches_subscribers_on_every_shard_in_order_once() {
    let mut cluster = Cluster::new(3, Config::default());
    let channel = homed_on(2, 3);
    let subscribers: Vec<Client> = (0..6).map(|i| cluster.connect(i % 3, "/ws")).collect();
    for &s in &subscribers {
        cluster.send(
            s,
            &format!(r#"{{"type":"subscribe","channel":"{channel}","id":1}}"#),
        );
    }
    cluster.settle();
    for &s in &subscribers {
        let texts = cluster.texts(s);
        assert_eq!(
            texts,
            [format!(
                r#"{{"type":"subscribed","channel":"{channel}","seq":0,"epoch":"e1","id":1}}"#
            )]
        );
    }
    let publisher = cluster.connect(0, "/ws");
    for n in 0..5 {
        let json =
            format!(r#"{{"type":"publish","channel":"{channel}","data":[{n}, "x"],"id":{n}}}"#);
        cluster.send(publisher, &json);
    }
    cluster.settle();
    let acks = cluster.texts(publisher);
    let expected: Vec<String> = (0..5)
        .map(|n| format!(r#"{{"type":"ack","id":{n},"seq":{}}}"#, n + 1))
        .collect();
    assert_eq!(acks, expected);
    for &s in &subscribers {
        let expected: Vec<String> = (0..5)
            .map(|n| {
                format!(
                    r#"{{"type":"message","channel":"{channel}","seq":{},"data":[{n}, "x"]}}"#,
                    n + 1
                )
            })
            .collect();
        assert_eq!(cluster.texts(s), expected);
    }
}

#[test]
fn every_subscriber_shares_one_frame_allocation() {
    let mut cluster = Cluster::new(2, Config::default());
    let a = cluster.connect(0, "/ws");
    let b = cluster.connect(1, "/ws");
    for c in [a, b] {
        cluster.send(c, r#"{"type":"subscribe","channel":"news"}"#);
    }
    cluster.settle();
    cluster.take_output(a);
    cluster.take_output(b);
    cluster.send(a, r#"{"type":"publish","channel":"news","data":1}"#);
    cluster.settle();
    let front = |cluster: &mut Cluster, c: Client| {
        let outbox = cluster.shards[c.shard].outbox(c.key);
        let mut slices = [std::io::IoSlice::new(&[]); 1];
        outbox.io_slices(&mut slices);
        slices[0].as_ptr()
    };
    assert_eq!(front(&mut cluster, a), front(&mut cluster, b));
}

#[test]
fn compressing_subscribers_share_one_deflated_frame_allocation() {
    let config = Config {
        compression: crate::compression::CompressionPolicies {
            default: CompressionPolicy::Shared,
            by_prefix: Vec::new(),
        },
        ..Config::default()
    };
    let mut cluster = Cluster::new(2, config);
    let deflating = |cluster: &mut Cluster, shard: usize| {
        let key = cluster.shards[shard]
            .accept(cluster.now, LOCALHOST)
            .unwrap();
        let client = Client { shard, key };
        let head = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n";
        cluster.write(client, head.as_bytes());
        let response = String::from_utf8(cluster.take_output(client)).unwrap();
        assert!(response.contains("\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"));
        client
    };
    let a = deflating(&mut cluster, 0);
    let b = deflating(&mut cluster, 1);
    let plain = cluster.connect(1, "/ws");
    for c in [a, b, plain] {
        cluster.send(c, r#"{"type":"subscribe","channel":"news"}"#);
    }
    cluster.settle();
    for c in [a, b, plain] {
        cluster.take_output(c);
    }
    let data = format!("[{}]", vec!["\"compressible\""; 50].join(","));
    cluster.send(
        a,
        &format!(r#"{{"type":"publish","channel":"news","data":{data}}}"#),
    );
    cluster.settle();
    let front = |cluster: &mut Cluster, c: Client| {
        let outbox = cluster.shards[c.shard].outbox(c.key);
        let mut slices = [std::io::IoSlice::new(&[]); 1];
        outbox.io_slices(&mut slices);
        (slices[0].as_ptr(), slices[0][0], slices[0].len())
    };
    let (shared, first_byte, len) = front(&mut cluster, a);
    assert_eq!(first_byte, 0xC1, "FIN, RSV1, text");
    assert_eq!(front(&mut cluster, b).0, shared);
    let (plain_ptr, plain_first, plain_len) = front(&mut cluster, plain);
    assert_ne!(plain_ptr, shared);
    assert_eq!(plain_first, 0x81);
    assert!(len * 4 < plain_len, "{len} vs {plain_len}");
}

#[test]
fn unsubscribe_while_pending_is_carried_out_after_confirmation() {
    let mut cluster = Cluster::new(2, Config::default());
    let channel = homed_on(1, 2);
    let c = cluster.connect(0, "/ws");
    cluster.send(
        c,
        &format!(r#"{{"type":"subscribe","channel":"{channel}","id":1}}"#),
    );
    cluster.send(
        c,
        &format!(r#"{{"type":"unsubscribe","channel":"{channel}","id":2}}"#),
    );
    cluster.settle();
    let texts = cluster.texts(c);
    assert!(texts[0].starts_with(r#"{"type":"subscribed""#), "{texts:?}");
    assert_eq!(
        texts[1],
        format!(r#"{{"type":"unsubscribed","channel":"{channel}","id":2}}"#)
    );
    assert_eq!(cluster.home_counts(&channel), [0, 0]);
}

#[test]
fn a_closed_connection_releases_its_subscriptions() {
    let mut cluster = Cluster::new(2, Config::default());
    let channel = homed_on(0, 2);
    let c = cluster.connect(1, "/ws");
    cluster.send(
        c,
        &format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#),
    );
    cluster.settle();
    assert_eq!(cluster.home_counts(&channel), [0, 1]);
    cluster.shards[1].handle_eof(c.key);
    assert_eq!(cluster.shards[1].poll_dead(), Some(c.key));
    cluster.shards[1].remove(c.key);
    cluster.settle();
    assert_eq!(cluster.home_counts(&channel), [0, 0]);
}

#[test]
fn refuses_duplicate_and_unknown_subscriptions_and_too_many() {
    let config = Config {
        max_subscriptions: 1,
        ..Config::default()
    };
    let mut cluster = Cluster::new(1, config);
    let c = cluster.connect(0, "/ws");
    cluster.send(c, r#"{"type":"subscribe","channel":"a"}"#);
    cluster.send(c, r#"{"type":"subscribe","channel":"a","id":2}"#);
    cluster.send(c, r#"{"type":"subscribe","channel":"b","id":3}"#);
    cluster.send(c, r#"{"type":"unsubscribe","channel":"zz","id":4}"#);
    cluster.settle();
    let codes: Vec<String> = cluster
        .texts(c)
        .into_iter()
        .filter(|t| t.contains("error"))
        .collect();
    assert!(
        codes[0].contains(r#""code":"already_subscribed""#),
        "{codes:?}"
    );
    assert!(
        codes[1].contains(r#""code":"too_many_subscriptions""#),
        "{codes:?}"
    );
    assert!(codes[2].contains(r#""code":"not_subscribed""#), "{codes:?}");
}

#[test]
fn since_that_history_cannot_serve_is_a_history_gap() {
    let config = Config {
        history: hub::HistoryLimits {
            size: 1,
            ttl: Duration::from_secs(60),
        },
        ..Config::default()
    };
    let mut cluster = Cluster::new(2, config);
    let p = cluster.connect(0, "/ws");
    for n in 1..=3 {
        cluster.send(
            p,
            &format!(r#"{{"type":"publish","channel":"c","data":{n}}}"#),
        );
    }
    cluster.settle();
    let c = cluster.connect(1, "/ws");
    cluster.send(c, r#"{"type":"subscribe","channel":"c","since":1,"id":9}"#);
    cluster.send(
        c,
        r#"{"type":"subscribe","channel":"d","since":0,"epoch":"old","id":10}"#,
    );
    // A second subscribe to "c" on `c` would be refused while the first is pending.
    let current = cluster.connect(1, "/ws");
    cluster.send(
        current,
        r#"{"type":"subscribe","channel":"c","since":2,"epoch":"e1","id":11}"#,
    );
    cluster.settle();
    let mut texts = cluster.texts(c);
    texts.extend(cluster.texts(current));
    // Replies from different homes may come in either order: find each by its id.
    let reply = |id: &str| texts.iter().find(|t| t.contains(id)).unwrap().clone();
    assert!(
        reply(r#""id":9"#).starts_with(
            r#"{"type":"error","code":"history_gap","channel":"c","seq":3,"oldest":3,"#
        ),
        "{texts:?}"
    );
    assert!(reply(r#""id":10"#).contains(r#""code":"history_gap""#));
    assert!(reply(r#""id":11"#).starts_with(r#"{"type":"subscribed","channel":"c","seq":3"#));
    assert!(texts.iter().any(|t| t.contains(r#""seq":3,"data":3"#)));
    assert_eq!(cluster.home_counts("c"), [0, 1]);
}

#[test]
fn since_replays_then_continues_live_without_gap_or_duplicate() {
    let mut cluster = Cluster::new(2, Config::default());
    let channel = homed_on(0, 2);
    let p = cluster.connect(0, "/ws");
    let publish = |cluster: &mut Cluster, n: u32| {
        cluster.send(
            p,
            &format!(r#"{{"type":"publish","channel":"{channel}","data":{n}}}"#),
        );
    };
    for n in 1..=5 {
        publish(&mut cluster, n);
    }
    cluster.settle();
    let c = cluster.connect(1, "/ws");
    cluster.send(
        c,
        &format!(r#"{{"type":"subscribe","channel":"{channel}","since":2}}"#),
    );
    // Published while the subscribe travels to the home: must come after the replay.
    publish(&mut cluster, 6);
    cluster.settle();
    publish(&mut cluster, 7);
    cluster.settle();
    let texts = cluster.texts(c);
    let seqs: Vec<&str> = texts
        .iter()
        .map(|t| {
            let rest = &t[t.find("\"seq\":").unwrap() + 6..];
            &rest[..rest.find(',').unwrap()]
        })
        .collect();
    assert_eq!(seqs, ["3", "4", "5", "6", "6", "7"], "{texts:?}");
    assert!(texts[4].starts_with(r#"{"type":"subscribed""#), "{texts:?}");
}

#[test]
fn a_replay_larger_than_the_budget_goes_out_in_chunks_as_the_socket_drains() {
    let budget = 4096;
    let config = Config {
        outbound_queue_bytes: budget,
        ..Config::default()
    };
    let mut cluster = Cluster::new(2, config);
    let channel = homed_on(0, 2);
    let p = cluster.connect(0, "/ws");
    let data = format!("\"{}\"", "x".repeat(500));
    let publish = |cluster: &mut Cluster| {
        cluster.send(
            p,
            &format!(r#"{{"type":"publish","channel":"{channel}","data":{data}}}"#),
        );
    };
    // 60 messages of ~560 bytes: eight times the subscriber's budget.
    for _ in 0..60 {
        publish(&mut cluster);
    }
    cluster.settle();
    let c = cluster.connect(1, "/ws");
    cluster.send(
        c,
        &format!(r#"{{"type":"subscribe","channel":"{channel}","since":0,"id":9}}"#),
    );
    let mut bytes = Vec::new();
    for round in 0..200 {
        cluster.settle();
        let queued = cluster.shards[1].outbox(c.key).len_bytes();
        assert!(
            queued <= budget + 600,
            "round {round}: {queued} bytes queued"
        );
        // Live messages keep coming while the replay goes out.
        if round % 5 == 0 && round < 100 {
            publish(&mut cluster);
        }
        bytes.extend(cluster.write_out(c, 1500));
    }
    let texts: Vec<String> = Cluster::parse_frames(&bytes)
        .into_iter()
        .map(|(_, p)| String::from_utf8(p).unwrap())
        .collect();
    let subscribed = texts
        .iter()
        .position(|t| t.starts_with(r#"{"type":"subscribed""#))
        .expect("subscribed after the replay");
    assert!(
        texts[subscribed].contains(r#""id":9"#),
        "{}",
        texts[subscribed]
    );
    let seqs: Vec<u64> = texts
        .iter()
        .filter(|t| t.starts_with(r#"{"type":"message""#))
        .map(|t| seq_of(t))
        .collect();
    // Every message once, in order, from 1 to the last published.
    assert_eq!(seqs, (1..=80).collect::<Vec<u64>>());
    assert_eq!(seq_of(&texts[subscribed]), seqs[subscribed - 1]);
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

#[test]
fn deadlines_of_answered_requests_do_not_pile_up() {
    let mut cluster = Cluster::new(1, Config::default());
    let p = cluster.connect(0, "/ws");
    cluster.send(p, r#"{"type":"publish","channel":"c","data":"a"}"#);
    cluster.settle();
    // One keep-alive connection asks 2,000 times for what history answers at once;
    // each request arms a request deadline and a 120 s poll deadline.
    let (client, _) = http(&mut cluster, 0, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    for _ in 0..2000 {
        cluster.now += Duration::from_millis(1);
        cluster.write(
            client,
            b"GET /poll?channel=c&since=0&timeout=120 HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        cluster.settle();
        let answer = cluster.take_output(client);
        assert!(answer.starts_with(b"HTTP/1.1 200 "));
    }
    let shard = &cluster.shards[0];
    let bound = 2 * shard.conns.len() + 64 + 1;
    assert!(
        shard.timed.len() <= bound,
        "{} poll deadlines",
        shard.timed.len()
    );
    assert!(
        shard.request_deadlines.len() <= bound,
        "{} request deadlines",
        shard.request_deadlines.len()
    );
}

#[test]
fn http_publish_needs_the_api_key_and_returns_a_receipt() {
    let config = Config {
        api_key: Some("k3y".into()),
        ..Config::default()
    };
    let mut cluster = Cluster::new(2, config);
    let sub = cluster.connect(1, "/ws");
    cluster.send(sub, r#"{"type":"subscribe","channel":"news"}"#);
    cluster.settle();
    cluster.take_output(sub);
    let body = r#"{"channel":"news","data":{"a": 1}}"#;
    let request = |key: &str| {
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let (_, denied) = http(&mut cluster, 0, &request("wrong"));
    assert!(denied.starts_with("HTTP/1.1 401 "), "{denied}");
    assert!(denied.contains("WWW-Authenticate: Bearer\r\n"));
    let (_, ok) = http(&mut cluster, 0, &request("k3y"));
    assert!(ok.starts_with("HTTP/1.1 200 "), "{ok}");
    assert!(ok.ends_with(r#"{"seq":1,"subscribers":1}"#), "{ok}");
    assert_eq!(
        cluster.texts(sub),
        [r#"{"type":"message","channel":"news","seq":1,"data":{"a": 1}}"#]
    );
}

#[test]
fn http_publish_is_off_without_an_api_key() {
    let mut cluster = Cluster::new(1, Config::default());
    let (_, out) = http(
        &mut cluster,
        0,
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert!(out.starts_with("HTTP/1.1 403 "), "{out}");
}

#[test]
fn long_poll_answers_from_history_then_waits_for_the_next_message() {
    let config = Config {
        api_key: Some("k".into()),
        ..Config::default()
    };
    let mut cluster = Cluster::new(2, config);
    let p = cluster.connect(0, "/ws");
    cluster.send(p, r#"{"type":"publish","channel":"c","data":"a"}"#);
    cluster.settle();
    let (_, at_once) = http(
        &mut cluster,
        1,
        "GET /poll?channel=c&since=0 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(at_once.starts_with("HTTP/1.1 200 "), "{at_once}");
    assert!(
        at_once.ends_with(
            r#""seq":1,"messages":[{"type":"message","channel":"c","seq":1,"data":"a"}]}"#
        ),
        "{at_once}"
    );
    let (waiting, nothing_yet) = http(
        &mut cluster,
        1,
        "GET /poll?channel=c&since=1&timeout=5 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(nothing_yet, "");
    cluster.send(p, r#"{"type":"publish","channel":"c","data":"b"}"#);
    cluster.settle();
    let answer = String::from_utf8(cluster.take_output(waiting)).unwrap();
    assert!(
        answer.ends_with(
            r#""seq":2,"messages":[{"type":"message","channel":"c","seq":2,"data":"b"}]}"#
        ),
        "{answer}"
    );
    // Keep-alive: the same connection polls again and times out empty.
    cluster.write(
        waiting,
        b"GET /poll?channel=c&since=2&timeout=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    cluster.settle();
    assert!(cluster.take_output(waiting).is_empty());
    let later = cluster.now + Duration::from_secs(2);
    cluster.shards[1].handle_timeout(later);
    let empty = String::from_utf8(cluster.take_output(waiting)).unwrap();
    assert!(empty.ends_with(r#""seq":2,"messages":[]}"#), "{empty}");
    cluster.settle();
    assert_eq!(cluster.home_counts("c"), [0, 0]);
}

#[test]
fn event_stream_resumes_from_last_event_id() {
    let mut cluster = Cluster::new(2, Config::default());
    let p = cluster.connect(0, "/ws");
    for n in 1..=3 {
        cluster.send(
            p,
            &format!(r#"{{"type":"publish","channel":"c","data":{n}}}"#),
        );
    }
    cluster.settle();
    let (stream, head) = http(
        &mut cluster,
        1,
        "GET /sse?channel=c HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 2\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(head.contains("Content-Type: text/event-stream\r\n"));
    assert!(head.contains("event: subscribed\ndata: {\"channel\":\"c\",\"seq\":3,"));
    assert!(head.ends_with("id: 3\nevent: message\ndata: {\"type\":\"message\",\"channel\":\"c\",\"seq\":3,\"data\":3}\n\n"), "{head}");
    cluster.send(p, r#"{"type":"publish","channel":"c","data":4}"#);
    cluster.settle();
    let live = String::from_utf8(cluster.take_output(stream)).unwrap();
    assert!(live.starts_with("id: 4\n"), "{live}");
}

#[test]
fn metrics_and_stats_count_connections_and_deliveries() {
    let mut cluster = Cluster::new(1, Config::default());
    let a = cluster.connect(0, "/ws");
    cluster.send(a, r#"{"type":"subscribe","channel":"c"}"#);
    cluster.send(a, r#"{"type":"publish","channel":"c","data":1}"#);
    cluster.settle();
    cluster.shards[0].end_turn(Duration::from_micros(10), cluster.now);
    let (_, stats) = http(
        &mut cluster,
        0,
        "GET /api/stats HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    // Figures are as of each shard's last finished turn: the scrape's own connection
    // is not in them yet.
    assert!(
        stats.contains(r#""connections_by_transport":{"http":0,"websocket":1,"sse":0,"poll":0}"#),
        "{stats}"
    );
    assert!(stats.contains(r#""deliveries_total":1,"#), "{stats}");
    let (_, metrics) = http(&mut cluster, 0, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        metrics.contains("herald_connections{transport=\"websocket\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("herald_publish_flush_seconds_count 1\n"),
        "{metrics}"
    );
}

#[test]
fn slow_consumer_is_closed_with_4008_after_what_it_was_sent() {
    let config = Config {
        outbound_queue_bytes: 4096,
        ..Config::default()
    };
    let mut cluster = Cluster::new(1, config);
    let slow = cluster.connect(0, "/ws");
    cluster.send(slow, r#"{"type":"subscribe","channel":"c"}"#);
    cluster.settle();
    cluster.take_output(slow);
    let p = cluster.connect(0, "/ws");
    let data = "x".repeat(100);
    for _ in 0..100 {
        cluster.send(
            p,
            &format!(r#"{{"type":"publish","channel":"c","data":"{data}"}}"#),
        );
    }
    cluster.settle();
    let frames = cluster.frames(slow);
    let (last_op, last) = frames.last().unwrap();
    assert_eq!(*last_op, OpCode::Close);
    assert_eq!(u16::from_be_bytes([last[0], last[1]]), 4008);
    assert!(frames.len() < 100);
    assert_eq!(cluster.shards[0].counters().slow_consumer_closes_total, 1);
}

/// A subscriber that reads nothing while 100 messages of 100 bytes arrive on a 4 KiB
/// budget, under `policy`: returns the texts it would then read.
fn slow_subscriber_under(policy: SlowConsumerPolicy) -> Vec<String> {
    let config = Config {
        outbound_queue_bytes: 4096,
        slow_consumers: crate::limits::SlowConsumerPolicies {
            default: SlowConsumerPolicy::Disconnect,
            by_prefix: vec![crate::limits::SlowConsumerPrefix {
                prefix: "feed.".into(),
                policy,
            }],
        },
        ..Config::default()
    };
    let mut cluster = Cluster::new(1, config);
    let slow = cluster.connect(0, "/ws");
    cluster.send(slow, r#"{"type":"subscribe","channel":"feed.a"}"#);
    cluster.settle();
    cluster.take_output(slow);
    let p = cluster.connect(0, "/ws");
    let data = "x".repeat(100);
    for _ in 0..100 {
        cluster.send(
            p,
            &format!(r#"{{"type":"publish","channel":"feed.a","data":"{data}"}}"#),
        );
    }
    cluster.settle();
    assert_eq!(cluster.shards[0].counters().slow_consumer_closes_total, 0);
    cluster.texts(slow)
}

fn seq_of(text: &str) -> u64 {
    let rest = &text[text.find("\"seq\":").unwrap() + 6..];
    rest[..rest.find(',').unwrap()].parse().unwrap()
}

/// Every sequence number 1..=100 is delivered or inside a gap notice, in order;
/// returns how many gap notices there were.
fn assert_nothing_lost_silently(texts: &[String]) -> usize {
    let number = |text: &str, key: &str| -> u64 {
        let rest = &text[text.find(key).unwrap() + key.len()..];
        rest.split([',', '}']).next().unwrap().parse().unwrap()
    };
    let mut next = 1;
    let mut gaps = 0;
    for text in texts {
        if text.starts_with(r#"{"type":"gap","channel":"feed.a""#) {
            assert_eq!(number(text, "\"from\":"), next, "{texts:?}");
            next = number(text, "\"to\":") + 1;
            gaps += 1;
        } else {
            assert_eq!(seq_of(text), next, "{texts:?}");
            next += 1;
        }
    }
    assert_eq!(next, 101, "{texts:?}");
    gaps
}

#[test]
fn drop_oldest_sheds_with_gap_notices_and_loses_nothing_silently() {
    let texts = slow_subscriber_under(SlowConsumerPolicy::DropOldest);
    assert!(assert_nothing_lost_silently(&texts) >= 1);
}

#[test]
fn conflate_keeps_the_newest_message_with_a_gap_notice() {
    let texts = slow_subscriber_under(SlowConsumerPolicy::Conflate);
    // Conflation squeezed the queue to one message at a time: one widened notice.
    assert_eq!(assert_nothing_lost_silently(&texts), 1);
    assert_eq!(seq_of(texts.last().unwrap()), 100);
}

#[test]
fn drain_closes_every_websocket_with_1001_and_refuses_new_ones() {
    let mut cluster = Cluster::new(1, Config::default());
    let a = cluster.connect(0, "/ws");
    let b = cluster.connect(0, "/echo");
    cluster.shards[0].begin_drain(cluster.now);
    for c in [a, b] {
        let frames = cluster.frames(c);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].0, OpCode::Close);
        assert_eq!(&frames[0].1[..2], &1001u16.to_be_bytes());
    }
    assert_eq!(cluster.shards[0].accept(cluster.now, LOCALHOST), None);
    // The client answers the close: the connection finishes.
    let reply = encode_client_frame(OpCode::Close, true, &1001u16.to_be_bytes(), [9; 4]);
    cluster.write(a, &reply);
    cluster.take_output(a);
    assert!(cluster.shards[0].poll_flushed(a.key));
}

#[test]
fn incomplete_handshake_times_out_with_408() {
    let mut cluster = Cluster::new(1, Config::default());
    let key = cluster.shards[0].accept(cluster.now, LOCALHOST).unwrap();
    let c = Client { shard: 0, key };
    cluster.write(c, b"GET /ws HTTP/1.1\r\nHost:");
    let later = cluster.now + Duration::from_secs(11);
    cluster.shards[0].handle_timeout(later);
    let out = cluster.take_output(c);
    assert!(out.starts_with(b"HTTP/1.1 408 "), "{out:?}");
    assert!(cluster.shards[0].poll_flushed(key));
}

#[test]
fn idle_connection_is_pinged_then_closed() {
    let mut cluster = Cluster::new(1, Config::default());
    let c = cluster.connect(0, "/ws");
    let ping_at = cluster.now + Duration::from_secs(25);
    cluster.shards[0].handle_timeout(ping_at);
    assert_eq!(cluster.frames(c), [(OpCode::Ping, vec![])]);
    let close_at = ping_at + Duration::from_secs(50);
    cluster.shards[0].handle_timeout(close_at);
    let frames = cluster.frames(c);
    assert_eq!(frames[0].0, OpCode::Close);
    assert_eq!(&frames[0].1[..2], &1001u16.to_be_bytes());
}

#[test]
fn a_full_cluster_queue_refuses_at_once_and_never_blocks_the_shard() {
    let mut ctx = Context::new(Config::default(), 1, SystemTime::now()).unwrap();
    // The cluster thread never runs: whatever is queued stays queued.
    let (bridge, _idle) = Bridge::new(
        "redis://127.0.0.1:1",
        ctx.config.history,
        ctx.config.compression.clone(),
    )
    .unwrap();
    let conn = ConnRef {
        key: u32::MAX,
        generation: 0,
    };
    let filler = |channel: &str| cluster::Request::Subscribe {
        channel: channel.into(),
        shard: 0,
        conn,
        ticket: 0,
        since: None,
        epoch: None,
        id: None,
        max_replay_bytes: 0,
    };
    let mut i = 0;
    while bridge.send(filler(&format!("f{i}"))).is_ok() {
        i += 1;
    }
    let publish = || cluster::Request::Publish {
        channel: "p".into(),
        data: Bytes::new(),
        shard: 0,
        conn,
        id: None,
    };
    while bridge.send(publish()).is_ok() {}
    ctx.cluster = Some(bridge);
    let mut cluster = Cluster::with_context(1, ctx);
    let client = cluster.connect(0, "/ws");
    cluster.send(client, r#"{"type":"subscribe","channel":"news","id":1}"#);
    cluster.send(
        client,
        r#"{"type":"publish","channel":"news","data":1,"id":2}"#,
    );
    cluster.settle();
    let texts = cluster.texts(client);
    assert_eq!(texts.len(), 2, "{texts:?}");
    for (text, id) in texts.iter().zip([1, 2]) {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str(), v["id"].as_u64()),
            (Some("error"), Some("unavailable"), Some(id)),
            "{text}"
        );
    }
    // The refused subscription holds no slot: all of them are free for retries, and
    // the shard keeps reading the connection.
    let shard = &cluster.shards[0];
    assert!(shard.conns[client.key].subs.is_empty());
    assert_eq!(shard.conns[client.key].inflight_publishes, 0);
    assert!(cluster.shards[0].wants_read(client.key));

    let key = cluster.shards[0].accept(cluster.now, LOCALHOST).unwrap();
    let poller = Client { shard: 0, key };
    cluster.write(
        poller,
        b"GET /poll?channel=news HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let response = String::from_utf8(cluster.take_output(poller)).unwrap();
    assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
    assert!(response.contains("\r\nRetry-After: 1\r\n"), "{response}");
    assert!(response.contains(r#""code":"unavailable""#), "{response}");
}
