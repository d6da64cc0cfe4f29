//! Every integration test in one binary: the support modules are compiled once and one
//! link serves all, where a binary per file compiled and linked them again for each
//! (measured: 75 CPU-s for the 19 binaries against 16 for this one, built without
//! incremental state). One file: `cargo test --test it FILE::`, e.g.
//! `cargo test --test it limits::`.

mod auth;
mod backends;
mod client;
mod cluster;
mod cluster_identity;
mod cluster_user_limit;
mod compression;
mod doctor;
mod handshake;
mod hardening;
mod http;
mod identity;
mod limits;
mod operation;
mod pubsub;
mod recovery;
mod redis_cluster;
mod resources;
mod server_api;
mod shutdown;
mod state;
mod support;
mod support_deflate;
mod support_http;
mod support_redis;
mod support_redis_cluster;
mod tls;
