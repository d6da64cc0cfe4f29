//! The only code that touches sockets and the kernel. Each backend drives a
//! [`Shard`](crate::shard::Shard) through the same calling contract.

pub mod affinity;
pub mod epoll;
pub mod listener;
pub mod tls;
pub mod turn;
pub mod uring;
