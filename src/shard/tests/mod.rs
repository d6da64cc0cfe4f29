use std::time::{Duration, SystemTime};

use super::*;
use crate::cluster::{self, Bridge};
use crate::compression::CompressionPolicy;
use crate::config::Config;
use crate::hub::{self, ChannelName};
use crate::limits::SlowConsumerPolicy;
use crate::proto::OpCode;
use crate::proto::frame::encode_client_frame;

use super::harness::{self, Client, Cluster, NONCE, homed_on};
use crate::proto::client_handshake::ClientHandshake;

const LOCALHOST: IpAddr = harness::PEER;

/// Test-only views into a shard's private state.
trait Inspect {
    /// Subscribers of `channel` its home counts on each shard (one publish: counts it).
    fn home_counts(&mut self, channel: &str) -> Vec<u32>;
}

impl Inspect for Cluster {
    fn home_counts(&mut self, channel: &str) -> Vec<u32> {
        let home = hub::home_of(channel, self.shards.len());
        let name: ChannelName = channel.into();
        let now = self.now;
        self.shards[home]
            .channels
            .publish(&name, b"0", now)
            .shards
            .to_vec()
    }
}

fn http(cluster: &mut Cluster, shard: usize, request: &str) -> (Client, String) {
    let key = cluster.shards[shard]
        .accept(cluster.now, LOCALHOST)
        .unwrap();
    let client = Client { shard, key };
    cluster.write(client, request.as_bytes());
    cluster.settle();
    let out = cluster.take_output(client);
    (client, String::from_utf8(out).unwrap())
}

fn seq_of(text: &str) -> u64 {
    let rest = &text[text.find("\"seq\":").unwrap() + 6..];
    rest[..rest.find(',').unwrap()].parse().unwrap()
}

mod api;
mod heartbeats;
mod identity;
mod limits;
mod presence;
mod pubsub;
mod replay;
mod requests;
mod turn;
