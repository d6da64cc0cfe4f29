//! What one connection costs in memory, part by part: Herald's own user space, the
//! kernel's socket structures, TLS session state, a connection's own compressor, and the
//! socket buffers the kernel grants while data is queued. Plain arithmetic over documented
//! figures, with no IO, so that `herald doctor` (N connections on this machine) and
//! `herald-bench plan` (which puts in the user-space figure its sweep measured) count the
//! same parts the same way.

use serde::Serialize;

use crate::compression::CompressionPolicy;

/// Herald's own user-space memory per idle connection with one subscription, bytes:
/// 442–469 B at 19,000 connections on two shards, once connected and after a ping round,
/// on either backend, without a warm-up (`bench-client/memory.sh`'s measurement, README
/// "Measured").
pub const HERALD_BYTES_LOW: u64 = 470;
/// Herald's user space per connection while broadcasts flow: 450–554 B per subscriber
/// measured at 10,000 and 18,000 subscribers (`bench-client/backends.sh`), with room for
/// more subscriptions per connection and bursts queued; a slow consumer's queue is bounded
/// by `--outbound-queue-bytes` on its own.
pub const HERALD_BYTES_HIGH: u64 = 1_024;
/// Kernel socket structures per idle TCP connection (socket, `tcp_sock`, file, dentry,
/// inode, epoll item), bytes: outside `tcp_mem`, in slab.
pub const KERNEL_STRUCT_LOW: u64 = 2_048;
/// See [`KERNEL_STRUCT_LOW`].
pub const KERNEL_STRUCT_HIGH: u64 = 4_096;
/// rustls' session state per TLS connection, bytes, held idle or not: README "TLS", 11.0 KB
/// against 3.0 KB of server RSS per idle subscribed connection.
pub const TLS_SESSION_BYTES: u64 = 8_192;
/// A connection's own deflate compressor (`--compression per-connection`), bytes: about
/// 160 KiB at [`crate::proto::deflate::CompressorSettings::PER_CONNECTION`], allocated at
/// the connection's first compressed message and kept for its window.
pub const COMPRESSOR_BYTES: u64 = 160 * 1024;
/// `tcp_rmem` min + `tcp_wmem` min at the kernel's defaults: what a busy socket keeps
/// even under memory pressure.
pub const DEFAULT_BUFFERS_BUSY: u64 = 8_192;

/// One connection's memory, bytes, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PerConnection {
    /// Herald's user space (connection, subscriptions, buffers), low and high.
    pub herald: (u64, u64),
    /// Kernel socket structures, low and high.
    pub kernel_structures: (u64, u64),
    /// TLS session state; 0 without TLS.
    pub tls: u64,
    /// The connection's own compressor, once messages flow; 0 unless per-connection.
    pub compressor: u64,
    /// Socket buffers while data is queued (`tcp_rmem` + `tcp_wmem` minimums).
    pub buffers_busy: u64,
}

impl PerConnection {
    /// The documented figures for a server with or without TLS and with `compression`;
    /// `buffers_busy` is the machine's `tcp_rmem` + `tcp_wmem` minimum.
    #[must_use]
    pub fn new(tls: bool, compression: CompressionPolicy, buffers_busy: u64) -> Self {
        Self {
            herald: (HERALD_BYTES_LOW, HERALD_BYTES_HIGH),
            kernel_structures: (KERNEL_STRUCT_LOW, KERNEL_STRUCT_HIGH),
            tls: if tls { TLS_SESSION_BYTES } else { 0 },
            compressor: match compression {
                CompressionPolicy::PerConnection => COMPRESSOR_BYTES,
                CompressionPolicy::Off | CompressionPolicy::Shared => 0,
            },
            buffers_busy,
        }
    }

    /// The same with Herald's user space as measured (one figure for low and high).
    #[must_use]
    pub fn with_herald(self, bytes: u64) -> Self {
        Self {
            herald: (bytes, bytes),
            ..self
        }
    }

    /// An idle connection, low and high: no compressor yet, no data queued.
    #[must_use]
    pub fn idle(&self) -> (u64, u64) {
        (
            self.herald.0 + self.kernel_structures.0 + self.tls,
            self.herald.1 + self.kernel_structures.1 + self.tls,
        )
    }

    /// A connection that receives messages and has data queued, at the high figures.
    #[must_use]
    pub fn busy_high(&self) -> u64 {
        self.idle().1 + self.compressor + self.buffers_busy
    }
}

/// Bytes as MiB/GiB for people.
#[must_use]
pub fn human_bytes(b: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let f = b as f64;
    if f >= 1024.0 * MIB {
        format!("{:.1} GiB", f / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", f / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_counts_idle_and_the_compressor_only_once_messages_flow() {
        let plain = PerConnection::new(false, CompressionPolicy::Off, DEFAULT_BUFFERS_BUSY);
        assert_eq!(plain.idle(), (2_518, 5_120));
        assert_eq!(plain.busy_high(), 13_312);
        let shared = PerConnection::new(false, CompressionPolicy::Shared, DEFAULT_BUFFERS_BUSY);
        assert_eq!(shared, plain);
        let both = PerConnection::new(true, CompressionPolicy::PerConnection, 8_192);
        assert_eq!(both.idle(), (2_518 + 8_192, 5_120 + 8_192));
        assert_eq!(both.busy_high(), 13_312 + 8_192 + 163_840);
        let measured = both.with_herald(1_000);
        assert_eq!(
            measured.idle(),
            (1_000 + 2_048 + 8_192, 1_000 + 4_096 + 8_192)
        );
    }
}
