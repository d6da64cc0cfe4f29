//! Where shard threads run: `--threads N|auto` → one core id per shard.
//!
//! `auto` runs one shard per core this process may use (its affinity mask, so `taskset`
//! and cgroup cpusets are honoured). With more shards than cores, shards share cores
//! round-robin; that is allowed (for tests) but logged, since a shard that must share its
//! core loses the point of pinning. Match `--threads` to the NIC queues' cores when the
//! machine's interrupts are steered (see tuning/).

use core_affinity::CoreId;

use crate::config::Threads;

/// The core each shard is pinned to (`None`: no pinning possible on this system).
pub fn placement(threads: Threads) -> Vec<Option<CoreId>> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let count = match threads {
        Threads::Auto => cores.len().max(1),
        Threads::Count(n) => n,
    };
    if count > cores.len() && !cores.is_empty() {
        tracing::warn!(
            shards = count,
            cores = cores.len(),
            "more shards than cores: shards will share cores"
        );
    }
    (0..count)
        .map(|i| (!cores.is_empty()).then(|| cores[i % cores.len()]))
        .collect()
}
