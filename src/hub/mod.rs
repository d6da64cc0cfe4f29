//! Channels: which shard is a channel's home, its sequence numbers, and the broadcast frame
//! built once per publish. IO-free: shards call into it and move its values between them.
//!
//! A channel's home shard (a hash of its name) orders its publishes: it assigns the next
//! sequence number, encodes the message into one complete WebSocket frame and hands a
//! clone of that `Bytes` (same allocation) to every shard that has subscribers. Each
//! shard keeps its own table of which of its connections hold which channel
//! ([`Subscriptions`]), so delivery takes no lock.
//!
//! Neither table keeps a channel nobody holds: a shard drops a channel's entry with its
//! last subscriber there, and the home forgets a channel without subscribers or live
//! history (its sweep trims history by age even for channels never used again), without
//! ever reusing a sequence number for the name (see `channel.rs`).

#![deny(clippy::disallowed_methods)] // no clock reads here: see clippy.toml

mod channel;
pub mod presence;
mod subscriptions;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::proto::OpCode;
use crate::proto::deflate::Compressor;
use crate::proto::frame::server_frame_payload;

pub use channel::{
    Channels, Conflict, HistoryLimits, HistoryPolicy, Published, SubscribeOutcome, home_of,
};
pub use presence::{ConnId, Member, Presence};
pub use subscriptions::Subscriptions;

/// A channel name shared between shards without copying.
pub type ChannelName = Arc<str>;

/// One published message, encoded once: `frame` is the complete server frame every
/// subscriber on every shard receives, and `deflated`, where the channel's compression
/// policy is `shared`, the same message compressed once (RSV1, from an empty window) for
/// every subscriber that negotiated permessage-deflate.
#[derive(Debug, Clone)]
pub struct Broadcast {
    pub channel: ChannelName,
    pub seq: u64,
    pub frame: Bytes,
    pub deflated: Option<Bytes>,
    /// When the home ordered it: the start of publish→flush latency.
    pub published_at: Instant,
}

impl Broadcast {
    /// Deflates the frame once for every compressing subscriber of a `shared` channel,
    /// with `compressor` (the shared settings: each message from an empty window). Kept
    /// only when it saves bytes; tiny messages go plain to everyone.
    pub fn compress_shared(&mut self, compressor: &mut Compressor) {
        let payload = server_frame_payload(&self.frame);
        let deflated = compressor.encode_frame(OpCode::Text, &payload);
        self.deflated = (deflated.len() < self.frame.len()).then_some(deflated);
    }
}

/// Names this run of the node: a `since` from another epoch cannot be trusted, because
/// sequence numbers restart when the process does.
pub fn new_epoch(now: std::time::SystemTime) -> String {
    let nanos = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut n = nanos ^ (u64::from(std::process::id()) << 40);
    let mut out = Vec::with_capacity(13);
    while n > 0 {
        out.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
    }
    String::from_utf8(out).expect("ascii digits")
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests start a clock of their own
mod tests {
    use super::*;
    use crate::proto::deflate::{CompressorSettings, Inflater};
    use crate::proto::frame::FrameHeader;
    use crate::proto::pubsub;

    fn broadcast(data: &[u8]) -> Broadcast {
        Broadcast {
            channel: "news".into(),
            seq: 1,
            frame: pubsub::encode_message("news", 1, data),
            deflated: None,
            published_at: Instant::now(),
        }
    }

    #[test]
    fn a_shared_deflate_is_kept_only_when_it_saves_bytes_and_inflates_to_the_message() {
        let mut compressor = Compressor::new(CompressorSettings::SHARED, true);
        let mut tiny = broadcast(b"1");
        tiny.compress_shared(&mut compressor);
        assert!(tiny.deflated.is_none());

        let data = format!("[{}]", vec!["\"the same words again\""; 50].join(","));
        let mut big = broadcast(data.as_bytes());
        big.compress_shared(&mut compressor);
        let deflated = big.deflated.expect("repetitive JSON compresses");
        assert!(deflated.len() < big.frame.len() / 4);
        let (header, len) = FrameHeader::parse(&deflated).unwrap().unwrap();
        assert!(header.rsv == 0b100 && header.fin && header.opcode == OpCode::Text);
        let inflated = Inflater::default()
            .inflate(&deflated[len..], 1 << 20)
            .unwrap();
        assert_eq!(inflated, server_frame_payload(&big.frame));
    }
}
