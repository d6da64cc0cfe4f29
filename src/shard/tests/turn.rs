//! The loop turn of `crate::backend::turn` driving a shard through a scripted backend.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::backend::turn::{Loop, Sockets};

/// A backend whose only socket event is one publish on its first turn, and which notes,
/// for every socket it flushes, whether the other shard had mail at that moment.
struct Scripted {
    turns: u32,
    publisher: usize,
    publish: Vec<u8>,
    other_inbox: Inbox,
    stop: Arc<AtomicBool>,
    /// (turn, key flushed, the other shard had mail waiting when it was)
    flushes: Vec<(u32, usize, bool)>,
    /// What each flush wrote, with its turn.
    written: Vec<(u32, usize, Vec<u8>)>,
    /// Mailed to shard 0 by the post when the flush with this index starts.
    mail_during_flush: Option<(usize, Arc<Post>, Envelope)>,
}

impl Scripted {
    fn new(publisher: usize, publish: &str, other_inbox: Inbox, stop: Arc<AtomicBool>) -> Self {
        Self {
            turns: 0,
            publisher,
            publish: encode_client_frame(OpCode::Text, true, publish.as_bytes(), [1, 2, 3, 4]),
            other_inbox,
            stop,
            flushes: Vec::new(),
            written: Vec::new(),
            mail_during_flush: None,
        }
    }
}

impl Sockets for Scripted {
    fn wait(&mut self, _timeout: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }

    fn dispatch(&mut self, shard: &mut Shard, now: Instant) -> std::io::Result<()> {
        self.turns += 1;
        match self.turns {
            1 => {
                let publish = std::mem::take(&mut self.publish);
                shard
                    .read_buffer(self.publisher)
                    .extend_from_slice(&publish);
                shard.handle_read(self.publisher, now);
            }
            _ => self.stop.store(true, Ordering::Release),
        }
        Ok(())
    }

    fn next_wakeup(&self) -> Option<Instant> {
        None
    }

    fn has_pending(&self) -> bool {
        false
    }

    fn stop_accepting(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn flush(&mut self, shard: &mut Shard, key: usize, _now: Instant) -> std::io::Result<()> {
        if self
            .mail_during_flush
            .as_ref()
            .is_some_and(|(at, ..)| *at == self.flushes.len())
        {
            let (_, post, envelope) = self.mail_during_flush.take().unwrap();
            post.send(0, envelope);
        }
        self.flushes
            .push((self.turns, key, self.other_inbox.has_mail()));
        let outbox = shard.outbox(key);
        let mut slices = [std::io::IoSlice::new(&[]); 64];
        let n = outbox.io_slices(&mut slices);
        let bytes: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
        shard.handle_written(key, bytes.len());
        self.written.push((self.turns, key, bytes));
        Ok(())
    }

    fn close(&mut self, shard: &mut Shard, key: usize) -> std::io::Result<()> {
        shard.remove(key);
        Ok(())
    }
}

/// Two shards with `n` subscribers of a channel homed on shard 0, subscriber `i` on shard
/// `shard_of(i)`, and a publisher on shard 0; what they were sent so far is taken.
fn subscribed(
    n: usize,
    shard_of: impl Fn(usize) -> usize,
) -> (Cluster, String, Vec<Client>, Client) {
    let mut cluster = Cluster::new(2, Config::default());
    let channel = homed_on(0, 2);
    let subscribers: Vec<Client> = (0..n)
        .map(|i| cluster.connect(shard_of(i), "/ws"))
        .collect();
    for &s in &subscribers {
        cluster.send(
            s,
            &format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#),
        );
    }
    let publisher = cluster.connect(0, "/ws");
    cluster.settle();
    for &s in &subscribers {
        cluster.take_output(s);
    }
    (cluster, channel, subscribers, publisher)
}

/// Runs shard 0 in the loop turn over a scripted backend whose first turn reads one
/// publish from `publisher`, then drains; `mail` is mailed during the flush it names.
fn run_shard_0(
    cluster: Cluster,
    channel: &str,
    publisher: Client,
    mail: Option<(usize, Arc<Post>, Envelope)>,
) -> Scripted {
    let Cluster {
        mut shards,
        mut inboxes,
        post,
        ..
    } = cluster;
    let other_inbox = inboxes.pop().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let json = format!(r#"{{"type":"publish","channel":"{channel}","data":1,"id":7}}"#);
    let mut sockets = Scripted::new(publisher.key, &json, other_inbox, stop.clone());
    sockets.mail_during_flush = mail;
    Loop {
        shard: shards.swap_remove(0),
        inbox: inboxes.pop().unwrap(),
        post,
        stop,
        drain: Duration::ZERO,
    }
    .run(&mut sockets)
    .unwrap();
    sockets
}

#[test]
fn other_shards_get_a_broadcast_before_its_home_writes_to_its_own_subscribers() {
    let (cluster, channel, subscribers, publisher) = subscribed(4, |i| i % 2);
    let sockets = run_shard_0(cluster, &channel, publisher, None);

    // Turn one flushed the home's two subscribers and the publisher's ack; turn two, the
    // drain's close frames.
    let first_turn: Vec<_> = sockets.flushes[..3].to_vec();
    assert!(first_turn.iter().all(|&(turn, ..)| turn == 1));
    let mut keys: Vec<usize> = first_turn.iter().map(|&(_, key, _)| key).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [subscribers[0].key, subscribers[2].key, publisher.key]
    );
    assert!(
        first_turn
            .iter()
            .all(|&(.., other_had_mail)| other_had_mail),
        "the broadcast for shard 1 was sent only after shard 0 wrote: {first_turn:?}"
    );
    let broadcast = sockets.other_inbox.poll().expect("shard 1's broadcast");
    assert!(matches!(broadcast, Envelope::Broadcast(b) if b.seq == 1));
}

#[test]
fn mail_arriving_during_a_long_flush_is_written_in_the_same_turn() {
    let (cluster, channel, subscribers, publisher) = subscribed(200, |_| 0);
    let second_publish = Envelope::Publish {
        channel: channel.as_str().into(),
        data: Bytes::from_static(b"2"),
        publisher: None,
        expect_seq: None,
        // Its ack goes to shard 1, which is not running here.
        from: 1,
        conn: cluster.shards[0].conn_ref(publisher.key),
        id: Some(8),
    };
    // Another shard's publisher mails the home while it writes the first message.
    let mail = (10, cluster.post.clone(), second_publish);
    let sockets = run_shard_0(cluster, &channel, publisher, Some(mail));

    for s in &subscribers {
        let first_turn: Vec<u8> = sockets
            .written
            .iter()
            .filter(|(turn, key, _)| *turn == 1 && *key == s.key)
            .flat_map(|(.., bytes)| bytes.iter().copied())
            .collect();
        let texts: Vec<String> = Cluster::parse_frames(&first_turn)
            .into_iter()
            .map(|(_, payload)| String::from_utf8(payload).unwrap())
            .collect();
        assert_eq!(texts.len(), 2, "subscriber {}: {texts:?}", s.key);
        assert!(texts[1].contains(r#""seq":2,"data":2"#), "{texts:?}");
    }
}
