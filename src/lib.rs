//! Herald: a WebSocket push server for bare metal.
//!
//! ```text
//!             SO_REUSEPORT listeners, one per core (socket2)
//!                  |            |            |
//!              shard 0      shard 1  ...  shard N-1      one pinned thread each
//!              reactor      reactor       reactor        epoll (mio)
//!              conns        conns         conns          slab of connections, timer wheel
//!                  \            |            /
//!                   \   crossbeam queues + wakers       pre-encoded frames (bytes::Bytes)
//!                    \          |          /            shared by every shard, never copied
//!                     channel hub: each channel's home shard orders it (seq)
//! ```
//!
//! - [`proto`]: sans-IO protocol core (handshake, frames, UTF-8, close, JSON protocol).
//! - [`shard`]: one thread's connections, subscriptions and mailbox; no system calls.
//! - [`hub`]: channel homes, sequence numbers, the broadcast encoded once.
//! - [`backend`]: sockets, listeners, the epoll reactor and core pinning.
//! - [`http`]: the HTTP side of the same port: publish API, long-poll, SSE, metrics, assets.
//! - [`metrics`]: per-shard counters, merged when scraped.
//! - [`auth`]: JWT, channel permissions, the Origin allow-list.
//! - [`limits`]: token buckets and connection limits.
//! - [`compression`]: which channels go out compressed, shared or per connection.
//! - [`namespace`]: per-prefix channel policies (presence, join/leave).
//! - [`config`]: options from the command line, environment and TOML file.
//! - [`server`]: wires it together and drains on SIGINT/SIGTERM.
//! - [`cluster`]: with `--redis`, publishes, history and fan-out shared through Redis, and
//!   presence, join/leave and the server API for every node.
//! - [`client`]: `herald client`, the interactive terminal client.
//! - [`doctor`]: `herald doctor`, checks a machine's limits and sysctls for N connections.
//! - [`memory`]: what one connection costs in memory, by part (doctor and herald-bench
//!   plan both count with it).

pub mod auth;
pub mod backend;
pub mod client;
pub mod cluster;
pub mod compression;
pub mod config;
pub mod doctor;
pub mod http;
pub mod hub;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod namespace;
pub mod proto;
pub mod server;
pub mod shard;

pub use config::Config;
pub use server::serve;
