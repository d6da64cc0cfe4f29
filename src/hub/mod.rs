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
mod subscriptions;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

pub use channel::{Channels, HistoryLimits, Published, SubscribeOutcome, home_of};
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
