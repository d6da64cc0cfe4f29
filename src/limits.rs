//! Rate and connection limits, and the answer each gives when it is hit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{ChannelPolicies, PrefixPolicy};

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: Tokens,
    rate_per_sec: u64,
    burst: u64,
    /// Where the clock of `tokens` starts.
    origin: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: u64, burst: u64, now: Instant) -> Self {
        Self {
            tokens: Tokens::full(burst, Duration::ZERO),
            rate_per_sec,
            burst,
            origin: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let now = now.saturating_duration_since(self.origin);
        self.tokens.try_take(self.rate_per_sec, self.burst, now)
    }
}

/// A token bucket's level without its rate, for buckets that share one (each connection's
/// inbound messages): 16 bytes each instead of 40. Its times are on the owner's clock, as
/// the time since an origin the owner keeps (an `Instant` would take 16 bytes, not 8).
#[derive(Debug, Clone)]
pub struct Tokens {
    /// Tokens, in millionths, so refills are exact integers.
    micro_tokens: u64,
    /// When tokens were last taken, in nanoseconds on the owner's clock.
    last: u64,
}

impl Tokens {
    /// A full bucket of `burst`, at `now` on the owner's clock.
    pub fn full(burst: u64, now: Duration) -> Self {
        Self {
            micro_tokens: burst * 1_000_000,
            last: nanos(now),
        }
    }

    /// Takes one token if there is one, refilling at `rate_per_sec` up to `burst` (at
    /// least one) first.
    pub fn try_take(&mut self, rate_per_sec: u64, burst: u64, now: Duration) -> bool {
        let now = nanos(now);
        let elapsed = Duration::from_nanos(now.saturating_sub(self.last));
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

fn nanos(time: Duration) -> u64 {
    u64::try_from(time.as_nanos()).unwrap_or(u64::MAX)
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
    /// The token's user holds `--max-connections-per-user` already: 429.
    PerUser,
}

impl Refusal {
    /// Every refusal, for clients that tell them apart by status and message.
    pub const ALL: [Self; 4] = [Self::Full, Self::PerIp, Self::AcceptRate, Self::PerUser];

    pub fn status(self) -> u16 {
        match self {
            Self::Full | Self::AcceptRate => 503,
            Self::PerIp | Self::PerUser => 429,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Self::Full => "the server is at its connection limit; retry later",
            Self::PerIp => "too many connections from this address; retry later",
            Self::AcceptRate => "too many new connections; retry later",
            Self::PerUser => "this user holds as many connections as it may; close one first",
        }
    }

    /// The `herald serve` option that sets the limit, so whoever was refused can say what
    /// to raise.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Full => "--max-connections",
            Self::PerIp => "--max-connections-per-ip",
            Self::AcceptRate => "--accept-rate",
            Self::PerUser => "--max-connections-per-user",
        }
    }
}

/// Connections in all, per client address and per user, shared by every shard. Touched
/// when a connection starts and ends, never per message.
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    max_per_user: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    /// Only users holding a connection are in it: its size is bounded by the connections.
    per_user: Mutex<HashMap<Arc<str>, u32>>,
}

impl ConnectionLimits {
    /// `max_per_ip == 0` means no per-address limit; `max_per_user == 0` none per user.
    pub fn new(max_total: usize, max_per_ip: usize, max_per_user: usize) -> Self {
        Self {
            max_total,
            max_per_ip,
            max_per_user,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            per_user: Mutex::new(HashMap::new()),
        }
    }

    /// Whether connections are counted per user at all.
    pub fn limits_users(&self) -> bool {
        self.max_per_user > 0
    }

    /// Counts a connection of `user` against `--max-connections-per-user`; on success the
    /// caller must [`ConnectionLimits::release_user`] it when the connection ends.
    pub fn count_user(&self, user: &Arc<str>) -> Result<(), Refusal> {
        let mut per_user = self.per_user.lock().expect("limits lock");
        let count = per_user.entry(user.clone()).or_insert(0);
        if *count as usize >= self.max_per_user {
            if *count == 0 {
                per_user.remove(user);
            }
            return Err(Refusal::PerUser);
        }
        *count += 1;
        Ok(())
    }

    pub fn release_user(&self, user: &str) {
        let mut per_user = self.per_user.lock().expect("limits lock");
        if let Some(count) = per_user.get_mut(user) {
            *count -= 1;
            if *count == 0 {
                per_user.remove(user);
            }
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
        let limits = ConnectionLimits::new(3, 2, 0);
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
    fn per_user_limit_counts_each_user_apart() {
        let limits = ConnectionLimits::new(100, 0, 2);
        let (ann, bob): (Arc<str>, Arc<str>) = ("ann".into(), "bob".into());
        assert_eq!(limits.count_user(&ann), Ok(()));
        assert_eq!(limits.count_user(&ann), Ok(()));
        assert_eq!(limits.count_user(&ann), Err(Refusal::PerUser));
        assert_eq!(limits.count_user(&bob), Ok(()));
        limits.release_user(&ann);
        assert_eq!(limits.count_user(&ann), Ok(()));
        for user in [&ann, &ann, &bob] {
            limits.release_user(user);
        }
        assert!(limits.per_user.lock().unwrap().is_empty(), "nobody is kept");
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
