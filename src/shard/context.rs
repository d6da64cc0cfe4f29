//! What every shard of a node shares: the configuration, the epoch, the metrics
//! registry, the authenticator, the connection limits and the cluster link.

use std::time::SystemTime;

use crate::auth::Authenticator;
use crate::cluster::Bridge;
use crate::config::Config;
use crate::hub;
use crate::limits::ConnectionLimits;
use crate::metrics::Registry;

/// What every shard shares, read-only apart from the atomics inside: built once at start.
pub struct Context {
    pub config: Config,
    /// This run's epoch: sequence numbers restart with it.
    pub epoch: Box<str>,
    pub registry: Registry,
    pub auth: Authenticator,
    pub limits: ConnectionLimits,
    /// The cluster link with `--redis`: channels are then ordered and stored in Redis
    /// instead of by their home shard.
    pub cluster: Option<Bridge>,
    /// When the node started: its epoch and the shards' jitter seeds derive from it.
    started: SystemTime,
}

impl Context {
    /// A seed for shard `id`'s `Retry-After` jitter.
    pub(super) fn jitter_seed(&self, id: usize) -> u64 {
        jitter_seed(self.started, id)
    }

    /// Checks what needs checking (keys, files) once; errors are for the operator.
    pub fn new(config: Config, shards: usize, started: SystemTime) -> Result<Self, String> {
        Ok(Self {
            auth: Authenticator::new(&config.auth)?,
            limits: ConnectionLimits::new(
                config.max_connections,
                config.max_connections_per_ip,
                config.max_connections_per_user,
            ),
            registry: Registry::new(shards),
            epoch: hub::new_epoch(started).into(),
            cluster: None,
            config,
            started,
        })
    }
}

/// A seed for `Retry-After` jitter that differs per shard and per run, so nodes
/// restarted together do not hand out the same sequence.
fn jitter_seed(started: SystemTime, shard: usize) -> u64 {
    let nanos = started
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos
        ^ u64::from(std::process::id()) << 32
        ^ (shard as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        | 1
}
