//! Rate and connection limits, and the answer each gives when it is hit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::{ChannelPolicies, PrefixPolicy};

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: Tokens,
    rate_per_sec: u64,
    burst: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: u64, burst: u64, now: Instant) -> Self {
        Self {
            tokens: Tokens::full(burst, now),
            rate_per_sec,
            burst,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.tokens.try_take(self.rate_per_sec, self.burst, now)
    }
}

/// A token bucket's level without its rate, for buckets that share one (each connection's
/// inbound messages): 24 bytes each instead of 40.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// Tokens, in millionths, so refills are exact integers.
    micro_tokens: u64,
    last: Instant,
}

impl Tokens {
    /// A full bucket of `burst`.
    pub fn full(burst: u64, now: Instant) -> Self {
        Self {
            micro_tokens: burst * 1_000_000,
            last: now,
        }
    }

    /// Takes one token if there is one, refilling at `rate_per_sec` up to `burst` (at
    /// least one) first.
    pub fn try_take(&mut self, rate_per_sec: u64, burst: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        let refill = (elapsed.as_micros() as u64).saturating_mul(rate_per_sec);
        let cap = burst.max(1) * 1_000_000;
        self.micro_tokens = (self.micro_tokens.saturating_add(refill)).min(cap);
        if self.micro_tokens >= 1_000_000 {
            self.micro_tokens -= 1_000_000;
            true
        } else {
            false
        }
    }
}

/// What happens when a subscriber's outbound queue passes its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SlowConsumerPolicy {
    /// Close with 4008; the client reconnects and recovers with `since`.
    Disconnect,
    /// Shed the oldest queued messages and send a `gap` notice (from, to) so the client
    /// can recover them with `since`.
    DropOldest,
    /// Keep only the newest queued message of the channel (prices, dashboards), with a
    /// `gap` notice for what was skipped.
    Conflate,
}

/// A slow-consumer policy for channels whose name starts with `prefix`.
pub type SlowConsumerPrefix = PrefixPolicy<SlowConsumerPolicy>;

/// The slow-consumer policy of every channel.
pub type SlowConsumerPolicies = ChannelPolicies<SlowConsumerPolicy>;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server holds `--max-connections` already: 503.
    Full,
    /// This address holds `--max-connections-per-ip` already: 429.
    PerIp,
    /// The shard accepts new connections faster than its accept rate: 503.
    AcceptRate,
}

impl Refusal {
    /// Every refusal, for clients that tell them apart by status and message.
    pub const ALL: [Self; 3] = [Self::Full, Self::PerIp, Self::AcceptRate];

    pub fn status(self) -> u16 {
        match self {
            Self::Full | Self::AcceptRate => 503,
            Self::PerIp => 429,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Self::Full => "the server is at its connection limit; retry later",
            Self::PerIp => "too many connections from this address; retry later",
            Self::AcceptRate => "too many new connections; retry later",
        }
    }

    /// The `herald serve` option that sets the limit, so whoever was refused can say what
    /// to raise.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Full => "--max-connections",
            Self::PerIp => "--max-connections-per-ip",
            Self::AcceptRate => "--accept-rate",
        }
    }
}

/// Connections in all and per client address, shared by every shard. Touched when a
/// connection starts and ends, never per message.
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
}

impl ConnectionLimits {
    /// `max_per_ip == 0` means no per-address limit.
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        Self {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an accepted socket. Beyond a small margin over the limit the socket is not
    /// worth a response (it is closed at once, keeping descriptors for the others).
    pub fn accept(&self) -> bool {
        let before = self.total.fetch_add(1, Ordering::Relaxed);
        if before >= self.max_total + self.max_total / 10 + 64 {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Uncounts an accepted socket.
    pub fn close(&self) {
        self.total.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether the server holds more sockets than `--max-connections`: a request that
    /// would hold its connection (WebSocket, stream, poll) is then refused with 503.
    pub fn check_total(&self) -> Result<(), Refusal> {
        if self.total.load(Ordering::Relaxed) > self.max_total {
            return Err(Refusal::Full);
        }
        Ok(())
    }

    /// Counts a connection from `ip` against the per-address limit; on success the caller
    /// must [`ConnectionLimits::release`] it when the connection ends.
    pub fn count(&self, ip: IpAddr) -> Result<(), Refusal> {
        let mut per_ip = self.per_ip.lock().expect("limits lock");
        let count = per_ip.entry(ip).or_insert(0);
        if self.max_per_ip > 0 && *count as usize >= self.max_per_ip {
            if *count == 0 {
                per_ip.remove(&ip);
            }
            return Err(Refusal::PerIp);
        }
        *count += 1;
        Ok(())
    }

    pub fn release(&self, ip: IpAddr) {
        let mut per_ip = self.per_ip.lock().expect("limits lock");
        if let Some(count) = per_ip.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&ip);
            }
        }
    }
}

/// The client's address: the peer, or, behind a trusted proxy, the last address the
/// proxy chain added to `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let Some(list) = forwarded_for else {
        return peer;
    };
    list.rsplit(',')
        .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
        .find(|ip| !trusted.contains(ip))
        .unwrap_or(peer)
}

/// A `Retry-After` in whole seconds, spread over `base..base + spread` so a crowd that
/// was refused together does not come back together.
pub fn retry_after(base: Duration, spread: Duration, seed: &mut u64) -> u64 {
    // xorshift64: cheap, and enough to de-synchronise clients.
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    let spread = spread.as_secs().max(1);
    base.as_secs().max(1) + *seed % spread
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 5, start);
        assert_eq!((0..10).filter(|_| bucket.try_take(start)).count(), 5);
        let later = start + Duration::from_millis(300);
        assert_eq!((0..10).filter(|_| bucket.try_take(later)).count(), 3);
        let much_later = later + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| bucket.try_take(much_later)).count(), 5);
    }

    #[test]
    fn per_ip_and_total_limits() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limits.accept());
        }
        assert_eq!(limits.count(a), Ok(()));
        assert_eq!(limits.count(a), Ok(()));
        assert_eq!(limits.count(a), Err(Refusal::PerIp));
        limits.release(a);
        assert_eq!(limits.count(a), Ok(()));
        assert_eq!(limits.count(b), Ok(()));
        assert_eq!(limits.check_total(), Ok(()));
        assert!(limits.accept());
        assert_eq!(limits.check_total(), Err(Refusal::Full));
        limits.close();
        assert_eq!(limits.check_total(), Ok(()));
    }

    #[test]
    fn each_refusal_names_an_option_of_serve() {
        let options =
            <crate::config::Options as clap::Args>::augment_args(clap::Command::new("serve"));
        for refusal in Refusal::ALL {
            let flag = refusal.flag().trim_start_matches("--");
            assert!(
                options
                    .get_arguments()
                    .any(|arg| arg.get_long() == Some(flag)),
                "{flag}"
            );
        }
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "192.0.2.9".parse().unwrap();
        let trusted = [proxy];
        let xff = Some("198.51.100.7, 203.0.113.5");
        assert_eq!(client_ip(other, xff, &trusted), other);
        assert_eq!(
            client_ip(proxy, xff, &trusted),
            "203.0.113.5".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(proxy, Some("garbage"), &trusted), proxy);
        assert_eq!(client_ip(proxy, None, &trusted), proxy);
    }

    #[test]
    fn longest_prefix_picks_the_policy() {
        let policies = SlowConsumerPolicies {
            default: SlowConsumerPolicy::Disconnect,
            by_prefix: vec![
                PrefixPolicy {
                    prefix: "prices.".into(),
                    policy: SlowConsumerPolicy::Conflate,
                },
                PrefixPolicy {
                    prefix: "prices.fx.".into(),
                    policy: SlowConsumerPolicy::DropOldest,
                },
            ],
        };
        assert_eq!(policies.policy_for("news"), SlowConsumerPolicy::Disconnect);
        assert_eq!(
            policies.policy_for("prices.btc"),
            SlowConsumerPolicy::Conflate
        );
        assert_eq!(
            policies.policy_for("prices.fx.eur"),
            SlowConsumerPolicy::DropOldest
        );
    }

    #[test]
    fn retry_after_is_spread() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        let values: std::collections::HashSet<u64> = (0..50)
            .map(|_| retry_after(Duration::from_secs(1), Duration::from_secs(5), &mut seed))
            .collect();
        assert!(values.iter().all(|v| (1..6).contains(v)));
        assert!(values.len() > 2);
    }
}
