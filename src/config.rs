//! Configuration: one name in three spellings (`--max-message-bytes`, TOML
//! `max_message_bytes`, `HERALD_MAX_MESSAGE_BYTES`), resolved once into a typed [`Config`].
//!
//! Precedence: command line, then environment, then the TOML file, then the default.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{AuthMode, AuthSettings};
use crate::compression::{CompressionPolicies, CompressionPolicy};
use crate::hub::HistoryLimits;
use crate::limits::{SlowConsumerPolicies, SlowConsumerPolicy};
use crate::namespace::{self, Namespace, NamespaceEntry, Namespaces, PublishRule};

/// Most frames one message may arrive in on /ws (and on /echo unless raised): a flood of
/// empty fragments costs work without growing the message.
pub const MAX_FRAGMENTS: u32 = 1024;

/// A per-channel setting for channels whose name starts with `prefix` (from a
/// `[[namespace]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixPolicy<P> {
    pub prefix: String,
    pub policy: P,
}

/// A setting per channel (slow-consumer handling, compression): the longest matching
/// prefix, else the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPolicies<P> {
    pub default: P,
    pub by_prefix: Vec<PrefixPolicy<P>>,
}

impl<P: Copy> ChannelPolicies<P> {
    pub fn policy_for(&self, channel: &str) -> P {
        self.by_prefix
            .iter()
            .filter(|p| channel.starts_with(&p.prefix))
            .max_by_key(|p| p.prefix.len())
            .map_or(self.default, |p| p.policy)
    }
}

/// How many shard threads to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// One per core this process may run on.
    Auto,
    Count(usize),
}

impl FromStr for Threads {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        match s.parse::<usize>() {
            Ok(n @ 1..=1024) => Ok(Self::Count(n)),
            _ => Err(format!(
                "threads must be \"auto\" or a number from 1 to 1024, not {s:?}"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Threads {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => n.to_string().parse(),
            Raw::Name(s) => s.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// Which reactor drives the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Io {
    /// epoll through mio.
    Epoll,
    /// io_uring, one ring per shard (Linux 5.11 or later; fails where it is unavailable).
    Uring,
    /// io_uring where it works (probed at start), else epoll with a log line saying why.
    Auto,
}

impl Io {
    /// The name `--io` takes (and `/metrics` reports once resolved).
    pub fn name(self) -> &'static str {
        match self {
            Self::Epoll => "epoll",
            Self::Uring => "uring",
            Self::Auto => "auto",
        }
    }
}

/// Every option of `herald serve`, each optional so the sources can be layered.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// Address to listen on; port 0 picks a free port (printed as `listening on ADDR`).
    /// [default: 127.0.0.1:8080]
    #[arg(long, env = "HERALD_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Shard threads, each pinned to its own core with its own listener: a number or `auto`
    /// (one per available core). [default: auto]
    #[arg(long, env = "HERALD_THREADS", value_name = "N|auto")]
    pub threads: Option<Threads>,

    /// IO backend. [default: auto]
    #[arg(long, env = "HERALD_IO", value_enum)]
    pub io: Option<Io>,

    /// Most simultaneous connections per process; further connects are closed at accept.
    /// [default: 1000000]
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Largest message (after reassembly) on /ws; larger ones close with 1009.
    /// [default: 65536]
    #[arg(long, env = "HERALD_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<u64>,

    /// Largest message on /echo; larger ones close with 1009. /echo has the limits of /ws
    /// unless a conformance run raises them (Autobahn sends up to 16 MiB).
    /// [default: --max-message-bytes]
    #[arg(long, env = "HERALD_ECHO_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub echo_max_message_bytes: Option<u64>,

    /// Most frames one /echo message may arrive in (1009 beyond), as on /ws unless a
    /// conformance run raises it (Autobahn sends up to 65536). [default: 1024]
    #[arg(long, env = "HERALD_ECHO_MAX_FRAGMENTS", value_name = "N")]
    pub echo_max_fragments: Option<u32>,

    /// Messages a second one /echo connection may send (burst: twice that); beyond are
    /// not echoed, and persisting closes with 1008, as on /ws.
    /// [default: --max-messages-per-second]
    #[arg(long, env = "HERALD_ECHO_MAX_MESSAGES_PER_SECOND", value_name = "N")]
    pub echo_max_messages_per_second: Option<u64>,

    /// Most channels one connection may subscribe to. [default: 128]
    #[arg(long, env = "HERALD_MAX_SUBSCRIPTIONS", value_name = "N")]
    pub max_subscriptions: Option<usize>,

    /// Most bytes queued for one slow connection before it is closed with 4008.
    /// [default: 1048576]
    #[arg(long, env = "HERALD_OUTBOUND_QUEUE_BYTES", value_name = "BYTES")]
    pub outbound_queue_bytes: Option<usize>,

    /// Time a client has to complete the HTTP upgrade. [default: 10000]
    #[arg(long, env = "HERALD_HANDSHAKE_TIMEOUT_MS", value_name = "MS")]
    pub handshake_timeout_ms: Option<u64>,

    /// Interval between server pings on an open WebSocket. [default: 25000]
    #[arg(long, env = "HERALD_PING_INTERVAL_MS", value_name = "MS")]
    pub ping_interval_ms: Option<u64>,

    /// A WebSocket pinged at a heartbeat that sends nothing back (a pong or any other
    /// frame) for this long is closed with 1001. [default: 10000]
    #[arg(long, env = "HERALD_PONG_TIMEOUT_MS", value_name = "MS")]
    pub pong_timeout_ms: Option<u64>,

    /// A connection silent for this long is closed (any frame counts, pongs included).
    /// [default: 60000]
    #[arg(long, env = "HERALD_IDLE_TIMEOUT_MS", value_name = "MS")]
    pub idle_timeout_ms: Option<u64>,

    /// Time allowed for the close handshake before the socket is closed. [default: 5000]
    #[arg(long, env = "HERALD_CLOSE_TIMEOUT_MS", value_name = "MS")]
    pub close_timeout_ms: Option<u64>,

    /// On SIGINT/SIGTERM: time to let clients answer close 1001 before exiting.
    /// [default: 10000]
    #[arg(long, env = "HERALD_DRAIN_MS", value_name = "MS")]
    pub drain_ms: Option<u64>,

    /// Let several herald processes serve the same port (SO_REUSEPORT): each process
    /// holds its own connections and open-file limit; fan-out across processes needs the
    /// cluster. Without it a port already in use is an error.
    #[arg(
        long,
        env = "HERALD_SHARED_PORT",
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub shared_port: Option<bool>,

    /// Channels keep who is subscribed (`presence`, `presence_stats`, `GET /api/presence`)
    /// unless a namespace says otherwise; with --redis, in Redis, for every node (a dead
    /// node's members drop out within 6 s). [default: false]
    #[arg(
        long,
        env = "HERALD_PRESENCE",
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub presence: Option<bool>,

    /// Subscribers get `join`/`leave` events as connections subscribe and leave, unless a
    /// namespace says otherwise. [default: false]
    #[arg(
        long,
        env = "HERALD_JOIN_LEAVE",
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub join_leave: Option<bool>,

    /// Listen backlog of each shard's socket. [default: 4096]
    #[arg(long, env = "HERALD_BACKLOG", value_name = "N")]
    pub backlog: Option<u32>,

    /// Messages each channel keeps for recovery (`since`, Last-Event-ID, long-poll);
    /// 0 keeps none. [default: 100]
    #[arg(long, env = "HERALD_HISTORY_SIZE", value_name = "N")]
    pub history_size: Option<usize>,

    /// Oldest message a channel's history keeps; a channel without subscribers is
    /// forgotten once its history is this old (within a few seconds more). [default: 300000]
    #[arg(long, env = "HERALD_HISTORY_TTL_MS", value_name = "MS")]
    pub history_ttl_ms: Option<u64>,

    /// Redis to share fan-out and history with other nodes (`redis://HOST:PORT[/DB]`), or
    /// a Redis Cluster by some of its nodes (`redis+cluster://HOST:PORT,HOST:PORT,...`:
    /// sharded pub/sub, each channel on the shard that owns its slot). Without it the
    /// node runs alone with its in-memory hub.
    #[arg(long, env = "HERALD_REDIS", value_name = "URL")]
    pub redis: Option<String>,

    /// With `--redis`: acknowledge a publish only once this many replicas of the Redis
    /// master that stored it hold it too (`WAIT`, up to 1 s; fewer in time is refused
    /// `unavailable`/503). 0 acknowledges once the master has it, which a failover can
    /// still roll back. [default: 0]
    #[arg(long, env = "HERALD_REDIS_ACK_REPLICAS", value_name = "N")]
    pub redis_ack_replicas: Option<u32>,

    /// With `--redis`: most bytes of Redis traffic the node holds for each shard that has
    /// not taken it yet (the node stops reading Redis meanwhile), and most bytes of
    /// announcements read but not yet handled (past it they are dropped and every channel
    /// catches up from its Redis stream). [default: 8388608]
    #[arg(long, env = "HERALD_REDIS_BUFFER_BYTES", value_name = "BYTES")]
    pub redis_buffer_bytes: Option<usize>,

    /// Secret that `POST /api/publish` needs as `Authorization: Bearer KEY`. Without it,
    /// HTTP publishing is refused (403).
    #[arg(
        long,
        env = "HERALD_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// Largest HTTP request body (`POST /api/publish`); larger gets 413. [default: 1048576]
    #[arg(long, env = "HERALD_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,

    /// Tokens on /ws, /sse and /poll: off, optional, or required. [default: required when
    /// a JWT key is configured, off otherwise]
    #[arg(long, env = "HERALD_AUTH", value_enum)]
    pub auth: Option<AuthMode>,

    /// The one JWT algorithm accepted (HS256/384/512 with --jwt-secret; RS*, PS*, ES256,
    /// ES384, EdDSA with --jwt-public-key). [default: HS256 or RS256]
    #[arg(long, env = "HERALD_JWT_ALG", value_name = "ALG")]
    pub jwt_alg: Option<String>,

    /// Shared secret for HS* tokens (at least 32 bytes).
    #[arg(
        long,
        env = "HERALD_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,

    /// PEM public key file for RS*/PS*/ES*/EdDSA tokens.
    #[arg(long, env = "HERALD_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub jwt_public_key: Option<PathBuf>,

    /// Clock skew allowed on exp and nbf. [default: 5000]
    #[arg(long, env = "HERALD_JWT_LEEWAY_MS", value_name = "MS")]
    pub jwt_leeway_ms: Option<u64>,

    /// Channels anonymous clients may subscribe to (patterns: name, prefix.*, *).
    /// [default: * when auth is off or optional, none when required]
    #[arg(
        long,
        env = "HERALD_ANONYMOUS_SUBSCRIBE",
        value_delimiter = ',',
        value_name = "PATTERNS"
    )]
    pub anonymous_subscribe: Option<Vec<String>>,

    /// Channels anonymous clients may publish to. [default: * when auth is off, none
    /// otherwise]
    #[arg(
        long,
        env = "HERALD_ANONYMOUS_PUBLISH",
        value_delimiter = ',',
        value_name = "PATTERNS"
    )]
    pub anonymous_publish: Option<Vec<String>>,

    /// Origins browsers may connect from (e.g. https://app.example); others get 403.
    /// Empty: any origin. [default: empty]
    #[arg(
        long,
        env = "HERALD_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGINS"
    )]
    pub allowed_origins: Option<Vec<String>>,

    /// Proxies whose X-Forwarded-For names the client (for per-IP limits). [default: none]
    #[arg(
        long,
        env = "HERALD_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "IPS"
    )]
    pub trusted_proxies: Option<Vec<IpAddr>>,

    /// Most connections one client address may hold (429 beyond); 0: no limit.
    /// [default: 10000]
    #[arg(long, env = "HERALD_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<usize>,

    /// Most connections (WebSocket, event stream, poll) one user (the token's `sub`) may
    /// hold (429 beyond; with --redis, on every live node together, checked in Redis
    /// before the upgrade is answered); 0: no limit. [default: 0]
    #[arg(long, env = "HERALD_MAX_CONNECTIONS_PER_USER", value_name = "N")]
    pub max_connections_per_user: Option<usize>,

    /// Messages a second one /ws connection may send (burst: twice that); beyond gets
    /// `rate_limited`, and persisting closes with 1008. [default: 100]
    #[arg(long, env = "HERALD_MAX_MESSAGES_PER_SECOND", value_name = "N")]
    pub max_messages_per_second: Option<u64>,

    /// New connections a second each shard takes (burst: the same); beyond gets 503 with
    /// a spread Retry-After, so a reconnect storm cannot starve connected clients.
    /// [default: 20000]
    #[arg(long, env = "HERALD_ACCEPT_RATE", value_name = "N")]
    pub accept_rate: Option<u64>,

    /// What a subscriber whose outbound queue is full gets: disconnect (close 4008),
    /// drop-oldest or conflate (both with a `gap` notice). Per channel prefix in the
    /// config file: [[namespace]] prefix = "prices." slow_consumer_policy = "conflate".
    /// [default: disconnect]
    #[arg(long, env = "HERALD_SLOW_CONSUMER_POLICY", value_enum)]
    pub slow_consumer_policy: Option<SlowConsumerPolicy>,

    /// permessage-deflate for clients that offer it: off, shared (each message compressed
    /// once for every subscriber) or per-connection (each subscriber's own compressor; about
    /// 11x the server CPU of shared per delivery, see the README). `--compression` alone
    /// means shared. Per channel prefix in the config file: [[namespace]]
    /// prefix = "chat." compression = "per-connection". [default: off]
    #[arg(
        long,
        env = "HERALD_COMPRESSION",
        value_enum,
        num_args = 0..=1,
        default_missing_value = "shared"
    )]
    pub compression: Option<CompressionPolicy>,

    /// Channel namespaces (config file only): `[[namespace]]` tables keyed by `prefix`,
    /// each setting any of history_size, history_ttl_ms, recovery ("stream" or "latest"),
    /// presence, join_leave, publish, personal_channels, expose_publisher,
    /// slow_consumer_policy, compression for its channels. Without any, `state.` is a
    /// `latest` namespace (the demo's counter is `state.counter`).
    #[arg(skip)]
    pub namespace: Option<Vec<NamespaceEntry>>,

    /// PEM certificate chain (leaf first): with --tls-key, the listener speaks TLS only
    /// (wss:// and https://). SIGHUP reloads both files. [default: none, plain TCP]
    #[arg(
        long,
        env = "HERALD_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(
        long,
        env = "HERALD_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
}

impl Options {
    /// Fills every option still unset from `lower`.
    fn or(self, lower: Self) -> Self {
        Self {
            listen: self.listen.or(lower.listen),
            threads: self.threads.or(lower.threads),
            io: self.io.or(lower.io),
            max_connections: self.max_connections.or(lower.max_connections),
            max_message_bytes: self.max_message_bytes.or(lower.max_message_bytes),
            echo_max_message_bytes: self.echo_max_message_bytes.or(lower.echo_max_message_bytes),
            echo_max_fragments: self.echo_max_fragments.or(lower.echo_max_fragments),
            echo_max_messages_per_second: self
                .echo_max_messages_per_second
                .or(lower.echo_max_messages_per_second),
            max_subscriptions: self.max_subscriptions.or(lower.max_subscriptions),
            outbound_queue_bytes: self.outbound_queue_bytes.or(lower.outbound_queue_bytes),
            handshake_timeout_ms: self.handshake_timeout_ms.or(lower.handshake_timeout_ms),
            ping_interval_ms: self.ping_interval_ms.or(lower.ping_interval_ms),
            pong_timeout_ms: self.pong_timeout_ms.or(lower.pong_timeout_ms),
            idle_timeout_ms: self.idle_timeout_ms.or(lower.idle_timeout_ms),
            close_timeout_ms: self.close_timeout_ms.or(lower.close_timeout_ms),
            drain_ms: self.drain_ms.or(lower.drain_ms),
            backlog: self.backlog.or(lower.backlog),
            shared_port: self.shared_port.or(lower.shared_port),
            presence: self.presence.or(lower.presence),
            join_leave: self.join_leave.or(lower.join_leave),
            history_size: self.history_size.or(lower.history_size),
            history_ttl_ms: self.history_ttl_ms.or(lower.history_ttl_ms),
            api_key: self.api_key.or(lower.api_key),
            redis: self.redis.or(lower.redis),
            redis_ack_replicas: self.redis_ack_replicas.or(lower.redis_ack_replicas),
            redis_buffer_bytes: self.redis_buffer_bytes.or(lower.redis_buffer_bytes),
            max_body_bytes: self.max_body_bytes.or(lower.max_body_bytes),
            auth: self.auth.or(lower.auth),
            jwt_alg: self.jwt_alg.or(lower.jwt_alg),
            jwt_secret: self.jwt_secret.or(lower.jwt_secret),
            jwt_public_key: self.jwt_public_key.or(lower.jwt_public_key),
            jwt_leeway_ms: self.jwt_leeway_ms.or(lower.jwt_leeway_ms),
            anonymous_subscribe: self.anonymous_subscribe.or(lower.anonymous_subscribe),
            anonymous_publish: self.anonymous_publish.or(lower.anonymous_publish),
            allowed_origins: self.allowed_origins.or(lower.allowed_origins),
            trusted_proxies: self.trusted_proxies.or(lower.trusted_proxies),
            max_connections_per_ip: self.max_connections_per_ip.or(lower.max_connections_per_ip),
            max_connections_per_user: self
                .max_connections_per_user
                .or(lower.max_connections_per_user),
            max_messages_per_second: self
                .max_messages_per_second
                .or(lower.max_messages_per_second),
            accept_rate: self.accept_rate.or(lower.accept_rate),
            slow_consumer_policy: self.slow_consumer_policy.or(lower.slow_consumer_policy),
            compression: self.compression.or(lower.compression),
            namespace: self.namespace.or(lower.namespace),
            tls_cert: self.tls_cert.or(lower.tls_cert),
            tls_key: self.tls_key.or(lower.tls_key),
        }
    }
}

/// The resolved configuration every part of the server reads.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub threads: Threads,
    /// `auto` until `serve` resolves it to the backend the shards run on.
    pub io: Io,
    pub max_connections: usize,
    pub max_message_bytes: u64,
    pub echo_max_message_bytes: u64,
    pub echo_max_fragments: u32,
    pub echo_max_messages_per_second: u64,
    pub max_subscriptions: usize,
    pub outbound_queue_bytes: usize,
    pub handshake_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub idle_timeout: Duration,
    pub close_timeout: Duration,
    pub drain: Duration,
    pub backlog: u32,
    pub shared_port: bool,
    /// Request head limits before the upgrade (DESIGN.md defaults).
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub history: HistoryLimits,
    pub api_key: Option<String>,
    /// The cluster's Redis (`--redis`); `None` runs the node alone.
    pub redis: Option<String>,
    /// Replicas that must hold a publish before it is acknowledged (`WAIT`).
    pub redis_ack_replicas: u32,
    /// Redis traffic held per shard, and announcements read ahead (`--redis-buffer-bytes`).
    pub redis_buffer_bytes: usize,
    pub max_body_bytes: usize,
    pub auth: AuthSettings,
    pub trusted_proxies: Vec<IpAddr>,
    pub max_connections_per_ip: usize,
    /// 0: no per-user limit.
    pub max_connections_per_user: usize,
    pub max_messages_per_second: u64,
    pub accept_rate: u64,
    /// Per channel, from its namespace (one entry per `[[namespace]]`).
    pub slow_consumers: SlowConsumerPolicies,
    /// Per channel, from its namespace (one entry per `[[namespace]]`).
    pub compression: CompressionPolicies,
    pub namespaces: Namespaces,
    /// Certificate chain and key files when the listener speaks TLS.
    pub tls: Option<TlsFiles>,
}

/// Where the TLS certificate chain and private key are read from (at start and on SIGHUP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Options::default()
            .resolve()
            .expect("the defaults are valid")
    }
}

impl Config {
    /// Layers the command line (which already includes the environment) over the TOML file.
    pub fn load(cli: Options, file: Option<&Path>) -> Result<Self, String> {
        let from_file = match file {
            Some(path) => read_file(path)?,
            None => Options::default(),
        };
        cli.or(from_file).resolve()
    }
}

fn read_file(path: &Path) -> Result<Options, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

impl Options {
    fn resolve(self) -> Result<Config, String> {
        let ms = Duration::from_millis;
        let history = HistoryLimits {
            size: self.history_size.unwrap_or(100),
            ttl: ms(self.history_ttl_ms.unwrap_or(300_000)),
            latest: false,
        };
        let resolved = namespace::resolve(
            self.namespace.unwrap_or_else(namespace::built_in),
            Namespace {
                presence: self.presence.unwrap_or(false),
                join_leave: self.join_leave.unwrap_or(false),
                publish: PublishRule::Token,
                personal_channels: true,
                expose_publisher: false,
                history,
            },
            self.slow_consumer_policy
                .unwrap_or(SlowConsumerPolicy::Disconnect),
            self.compression.unwrap_or(CompressionPolicy::Off),
        )?;
        let max_message_bytes = self.max_message_bytes.unwrap_or(64 * 1024);
        let max_messages_per_second = self.max_messages_per_second.unwrap_or(100);
        let config = Config {
            listen: self
                .listen
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
            threads: self.threads.unwrap_or(Threads::Auto),
            io: self.io.unwrap_or(Io::Auto),
            max_connections: self.max_connections.unwrap_or(1_000_000),
            max_message_bytes,
            echo_max_message_bytes: self.echo_max_message_bytes.unwrap_or(max_message_bytes),
            echo_max_fragments: self.echo_max_fragments.unwrap_or(MAX_FRAGMENTS),
            echo_max_messages_per_second: self
                .echo_max_messages_per_second
                .unwrap_or(max_messages_per_second),
            max_subscriptions: self.max_subscriptions.unwrap_or(128),
            outbound_queue_bytes: self.outbound_queue_bytes.unwrap_or(1024 * 1024),
            handshake_timeout: ms(self.handshake_timeout_ms.unwrap_or(10_000)),
            ping_interval: ms(self.ping_interval_ms.unwrap_or(25_000)),
            pong_timeout: ms(self.pong_timeout_ms.unwrap_or(10_000)),
            idle_timeout: ms(self.idle_timeout_ms.unwrap_or(60_000)),
            close_timeout: ms(self.close_timeout_ms.unwrap_or(5_000)),
            drain: ms(self.drain_ms.unwrap_or(10_000)),
            backlog: self.backlog.unwrap_or(4096),
            shared_port: self.shared_port.unwrap_or(false),
            max_head_bytes: 16 * 1024,
            max_headers: 100,
            history,
            api_key: self.api_key.filter(|k| !k.is_empty()),
            redis: self.redis.filter(|url| !url.is_empty()),
            redis_ack_replicas: self.redis_ack_replicas.unwrap_or(0),
            redis_buffer_bytes: self.redis_buffer_bytes.unwrap_or(8 * 1024 * 1024),
            max_body_bytes: self.max_body_bytes.unwrap_or(1024 * 1024),
            auth: AuthSettings {
                mode: self.auth,
                algorithm: self.jwt_alg,
                secret: self.jwt_secret.filter(|s| !s.is_empty()),
                public_key_file: self.jwt_public_key,
                leeway: ms(self.jwt_leeway_ms.unwrap_or(5_000)),
                anonymous_subscribe: self.anonymous_subscribe,
                anonymous_publish: self.anonymous_publish,
                allowed_origins: self.allowed_origins.unwrap_or_default(),
            },
            trusted_proxies: self.trusted_proxies.unwrap_or_default(),
            max_connections_per_ip: self.max_connections_per_ip.unwrap_or(10_000),
            max_connections_per_user: self.max_connections_per_user.unwrap_or(0),
            max_messages_per_second,
            accept_rate: self.accept_rate.unwrap_or(20_000),
            slow_consumers: resolved.slow_consumers,
            compression: resolved.compression,
            namespaces: resolved.namespaces,
            tls: match (self.tls_cert, self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                (None, None) => None,
                _ => return Err("tls_cert and tls_key must be given together".into()),
            },
        };
        config.check()?;
        Ok(config)
    }
}

impl Config {
    fn check(&self) -> Result<(), String> {
        let positive = [
            ("max_connections", self.max_connections as u64),
            ("max_subscriptions", self.max_subscriptions as u64),
            (
                "handshake_timeout_ms",
                self.handshake_timeout.as_millis() as u64,
            ),
            ("ping_interval_ms", self.ping_interval.as_millis() as u64),
            ("pong_timeout_ms", self.pong_timeout.as_millis() as u64),
            ("idle_timeout_ms", self.idle_timeout.as_millis() as u64),
            ("close_timeout_ms", self.close_timeout.as_millis() as u64),
            ("backlog", u64::from(self.backlog)),
            ("max_messages_per_second", self.max_messages_per_second),
            (
                "echo_max_messages_per_second",
                self.echo_max_messages_per_second,
            ),
            ("echo_max_fragments", u64::from(self.echo_max_fragments)),
            ("accept_rate", self.accept_rate),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be greater than 0"));
        }
        // Below 125 bytes not even a control frame fits; the ceiling keeps one message
        // from taking the machine's memory.
        for (name, value) in [
            ("max_message_bytes", self.max_message_bytes),
            ("echo_max_message_bytes", self.echo_max_message_bytes),
        ] {
            if !(125..=1 << 30).contains(&value) {
                return Err(format!(
                    "{name} must be between 125 and 1073741824, not {value}"
                ));
            }
        }
        // The token buckets count in millionths of a message, burst twice the rate.
        for (name, value) in [
            ("max_messages_per_second", self.max_messages_per_second),
            (
                "echo_max_messages_per_second",
                self.echo_max_messages_per_second,
            ),
        ] {
            if value > 1_000_000_000 {
                return Err(format!("{name} must be at most 1000000000, not {value}"));
            }
        }
        if self.history.size > 100_000 {
            return Err("history_size must be at most 100000".into());
        }
        if let Some(url) = &self.redis
            && !(url.starts_with("redis://")
                || url.starts_with("unix://")
                || url.starts_with("redis+cluster://"))
        {
            return Err(format!(
                "redis must be a redis://HOST:PORT or redis+cluster://HOST:PORT,... URL, not {url:?}"
            ));
        }
        if self.redis_ack_replicas > 16 {
            return Err("redis_ack_replicas must be at most 16".into());
        }
        if self.redis_buffer_bytes < 4096 {
            return Err("redis_buffer_bytes must be at least 4096".into());
        }
        if self.outbound_queue_bytes < 4096 {
            return Err("outbound_queue_bytes must be at least 4096".into());
        }
        Ok(())
    }
}

/// The command line of `herald serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the options below (same names, snake_case).
    #[arg(long, env = "HERALD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub options: Options,
}

#[cfg(test)]
mod tests;
