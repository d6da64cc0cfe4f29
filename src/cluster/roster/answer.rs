//! The roster's answers from Redis: presence pages and counts, a channel's history,
//! the channels of every live node with their subscriber counts, and the live nodes.

use std::collections::HashMap;

use ::redis::{RedisResult, Script, Value};

use super::{Conn, NODES, Question, Roster, channels_key, info_key, invoke, query};
use crate::auth::Patterns;
use crate::cluster::presence::{self, members_prefix, nodes_key, users_prefix};
use crate::cluster::script::{meta_key, stream_entries, stream_key};
use crate::http::api;
use crate::hub::ChannelName;
use crate::proto::pubsub;

/// The live nodes, in id order. KEYS: nodes.
const LIVE_SCRIPT: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local nodes = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
table.sort(nodes)
return nodes
";

/// Most stream entries one history read brings.
const HISTORY_CHUNK: usize = 64;

impl Roster {
    /// Answers a question from Redis: the JSON object to send, or why there is none.
    pub(super) async fn answer(
        &self,
        channel: &ChannelName,
        question: Question,
        max_bytes: usize,
    ) -> Result<Vec<u8>, String> {
        let Some(link) = self.link() else {
            return match question {
                // This node still answers for itself, `"nodes":null` saying the rest
                // is unknown.
                Question::Info { mut this } => {
                    this.pop();
                    this.extend_from_slice(b",\"node\":");
                    pubsub::push_json_str(&mut this, &self.node);
                    this.extend_from_slice(b",\"nodes\":null}");
                    Ok(this)
                }
                _ => Err("the cluster's Redis is unreachable; retry".into()),
            };
        };
        let failed = |e: ::redis::RedisError| format!("the cluster's Redis failed: {e}");
        match question {
            Question::Presence { cursor, limit } => {
                let (node, conn) = match cursor.as_deref() {
                    Some(cursor) => presence::parse_cursor(cursor)?,
                    None => ("", ""),
                };
                let mut call = self.page.key(nodes_key(channel));
                call.arg(members_prefix(channel))
                    .arg(node)
                    .arg(conn)
                    .arg(limit + 1);
                let pairs = invoke::<Value>(&link, &call).await.map_err(failed)?;
                Ok(presence::page_json(channel, pairs, limit, max_bytes))
            }
            Question::PresenceStats => {
                let mut call = self.stats.key(nodes_key(channel));
                call.arg(members_prefix(channel)).arg(users_prefix(channel));
                let (connections, users): (u64, u64) =
                    invoke(&link, &call).await.map_err(failed)?;
                let mut out = Vec::with_capacity(96);
                out.extend_from_slice(b"{\"type\":\"presence_stats\",\"channel\":");
                pubsub::push_json_str(&mut out, channel);
                out.extend_from_slice(
                    format!(",\"connections\":{connections},\"users\":{users}}}").as_bytes(),
                );
                Ok(out)
            }
            Question::History {
                since,
                limit,
                newest_first,
            } => self
                .history(&link, channel, since, (limit, newest_first), max_bytes)
                .await
                .map_err(failed),
            Question::Channels {
                pattern,
                cursor,
                limit,
            } => self
                .channels(&link, &pattern, cursor.as_deref(), limit)
                .await
                .map_err(failed),
            Question::Info { mut this } => {
                let nodes = self.live_nodes(&link).await.map_err(failed)?;
                let mut infos = Vec::with_capacity(nodes.len());
                for node in &nodes {
                    let mut hgetall = ::redis::cmd("HGETALL");
                    hgetall.arg(info_key(node));
                    let fields: HashMap<String, String> =
                        query(&link, &hgetall).await.map_err(failed)?;
                    infos.push((node, fields));
                }
                // `this` is an object: its closing brace makes room for the nodes.
                this.pop();
                this.extend_from_slice(b",\"node\":");
                pubsub::push_json_str(&mut this, &self.node);
                this.extend_from_slice(b",\"nodes\":[");
                for (i, (node, fields)) in infos.iter().enumerate() {
                    if i > 0 {
                        this.push(b',');
                    }
                    this.extend_from_slice(b"{\"node\":");
                    pubsub::push_json_str(&mut this, node);
                    this.extend_from_slice(b",\"version\":");
                    let version = fields.get("version").map_or("", String::as_str);
                    pubsub::push_json_str(&mut this, version);
                    for field in ["uptime_ms", "shards", "connections", "subscriptions"] {
                        let value: u64 =
                            fields.get(field).and_then(|v| v.parse().ok()).unwrap_or(0);
                        this.extend_from_slice(format!(",\"{field}\":{value}").as_bytes());
                    }
                    this.push(b'}');
                }
                this.extend_from_slice(b"]}");
                Ok(this)
            }
        }
    }

    pub(super) async fn live_nodes(&self, link: &Conn) -> RedisResult<Vec<String>> {
        let script = Script::new(LIVE_SCRIPT);
        invoke(link, &script.key(NODES)).await
    }

    /// `/api/history` from the channel's stream: the first `limit` after `since` (or the
    /// last `limit`, newest first), within `max_bytes` (at least one message).
    async fn history(
        &self,
        link: &Conn,
        channel: &ChannelName,
        since: Option<u64>,
        (limit, newest_first): (usize, bool),
        max_bytes: usize,
    ) -> RedisResult<Vec<u8>> {
        let mut meta = ::redis::cmd("HMGET");
        meta.arg(meta_key(channel)).arg("epoch").arg("seq");
        let (epoch, seq): (Option<String>, Option<u64>) = query(link, &meta).await?;
        let mut oldest = ::redis::cmd("XRANGE");
        oldest
            .arg(stream_key(channel))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        let first = stream_entries(query(link, &oldest).await?);
        let seq = seq.unwrap_or(0);
        let oldest = first.first().map_or(seq + 1, |(s, _)| *s);
        // Read a chunk at a time, so a page of large messages never brings more than
        // one chunk past the bytes the answer may hold.
        let mut frames = Vec::new();
        let mut bytes = 0;
        let mut edge = format!("({}-0", since.unwrap_or(0));
        let mut top = "+".to_owned();
        'read: while frames.len() < limit {
            let count = (limit - frames.len()).min(HISTORY_CHUNK);
            let mut read = if newest_first {
                let mut cmd = ::redis::cmd("XREVRANGE");
                cmd.arg(stream_key(channel)).arg(&top).arg(&edge);
                cmd
            } else {
                let mut cmd = ::redis::cmd("XRANGE");
                cmd.arg(stream_key(channel)).arg(&edge).arg("+");
                cmd
            };
            read.arg("COUNT").arg(count);
            let entries = stream_entries(query(link, &read).await?);
            let got = entries.len();
            for (seq, data) in entries {
                let frame = pubsub::encode_message(channel, seq, &data);
                bytes += frame.len();
                if !frames.is_empty() && bytes > max_bytes {
                    break 'read;
                }
                frames.push(frame);
                if newest_first {
                    top = format!("({seq}-0");
                } else {
                    edge = format!("({seq}-0");
                }
            }
            if got < count {
                break;
            }
        }
        let epoch = epoch.unwrap_or_default();
        Ok(api::history_json(channel, &epoch, (seq, oldest), &frames))
    }

    /// `/api/channels` over every live node's last report: subscriber counts summed.
    async fn channels(
        &self,
        link: &Conn,
        pattern: &Patterns,
        cursor: Option<&str>,
        limit: usize,
    ) -> RedisResult<Vec<u8>> {
        let mut totals: HashMap<String, u32> = HashMap::new();
        for node in self.live_nodes(link).await? {
            let mut hgetall = ::redis::cmd("HGETALL");
            hgetall.arg(channels_key(&node));
            let counts: HashMap<String, u32> = query(link, &hgetall).await?;
            for (channel, count) in counts {
                let after = cursor.is_none_or(|c| channel.as_str() > c);
                if after && pattern.allows(&channel) {
                    *totals.entry(channel).or_insert(0) += count;
                }
            }
        }
        let mut list: Vec<(ChannelName, u32)> = totals
            .into_iter()
            .map(|(channel, count)| (channel.into(), count))
            .collect();
        list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let more = list.len() > limit;
        list.truncate(limit);
        let next = list.last().filter(|_| more).map(|(name, _)| &**name);
        Ok(api::channels_json(&list, next))
    }
}
