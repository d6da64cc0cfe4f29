//! What Herald keeps in Redis and how it reads it back: the key names of a channel, the
//! Lua scripts that order a publish and read a channel's state, and the stream entries'
//! shape. No IO.

use ::redis::Value;
use bytes::Bytes;

/// Orders one publish. KEYS: meta, stream, pub/sub channel. ARGV: data, history size,
/// history ttl (ms; 0: none), a fresh epoch, the epoch this node last saw, the highest seq
/// it saw under that epoch, the seq the publisher expects the channel at (empty or absent:
/// any). An expected seq that is not the channel's stores nothing and returns nodes = -1
/// (a conflict), in the same atomic step as the ordering. A missing meta (never
/// published, evicted, lost in a restart) or a seq below what this node already handed
/// out (a rollback) starts a new epoch, so no sequence number is ever reused for a
/// different message. `PUBLISH` becomes `SPUBLISH`
/// on a Redis Cluster ([`publish_script`]).
const PUBLISH_SCRIPT: &str = r"
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local epoch, seq = meta[1], tonumber(meta[2]) or 0
if not epoch or (epoch == ARGV[5] and seq < tonumber(ARGV[6])) then
  epoch, seq = ARGV[4], 0
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
if ARGV[7] and ARGV[7] ~= '' and tonumber(ARGV[7]) ~= seq then
  return {epoch, seq, -1}
end
seq = seq + 1
redis.call('HSET', KEYS[1], 'seq', seq)
if tonumber(ARGV[2]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], seq .. '-0', 'd', ARGV[1])
  if tonumber(ARGV[3]) > 0 then
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  else
    redis.call('PERSIST', KEYS[2])
  end
end
local nodes = redis.call('PUBLISH', KEYS[3], seq .. ' ' .. epoch .. ' ' .. ARGV[1])
return {epoch, seq, nodes}
";

/// The ordering script: announced with `SPUBLISH` when `sharded` (a Redis Cluster: the
/// announcement stays on the shard that owns the channel's slot), `PUBLISH` otherwise.
pub(super) fn publish_script(sharded: bool) -> String {
    if sharded {
        PUBLISH_SCRIPT.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
    } else {
        PUBLISH_SCRIPT.to_string()
    }
}

/// Reads a channel's epoch and seq with the same rollback rule. KEYS: meta, stream.
/// ARGV: a fresh epoch, the epoch this node knows, the highest seq it saw under it.
pub(super) const META_SCRIPT: &str = r"
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local epoch, seq = meta[1], tonumber(meta[2]) or 0
if not epoch or (epoch == ARGV[2] and seq < tonumber(ARGV[3])) then
  epoch, seq = ARGV[1], 0
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
return {epoch, seq}
";

pub(super) fn meta_key(channel: &str) -> String {
    format!("herald:{{{}}}:meta", tag(channel))
}

pub(super) fn stream_key(channel: &str) -> String {
    format!("herald:{{{}}}:stream", tag(channel))
}

pub(super) fn pubsub_key(channel: &str) -> String {
    format!("herald:{{{}}}", tag(channel))
}

/// The channel as its keys spell it. Redis Cluster hashes the text between the first
/// `{` and the next `}`, or the whole key when that is empty: a channel starting with `}`
/// would put its three keys in three slots. A space, which no channel name holds, keeps
/// the tag non-empty and cannot collide with another channel's keys.
pub(super) fn tag(channel: &str) -> std::borrow::Cow<'_, str> {
    if channel.starts_with('}') {
        format!(" {channel}").into()
    } else {
        channel.into()
    }
}

/// The channel a pub/sub key names.
pub(super) fn channel_of(key: &str) -> Option<&str> {
    let tagged = key.strip_prefix("herald:{")?.strip_suffix('}')?;
    Some(tagged.strip_prefix(' ').unwrap_or(tagged))
}

/// `XRANGE` entries as `(seq, data)`: ids are `SEQ-0`, the one field is `d`.
pub(super) fn stream_entries(value: Value) -> Vec<(u64, Bytes)> {
    let Value::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(mut parts) = entry else {
                return None;
            };
            let fields = parts.pop()?;
            let id = match parts.pop()? {
                Value::BulkString(id) => String::from_utf8(id).ok()?,
                Value::SimpleString(id) => id,
                _ => return None,
            };
            let seq = id.strip_suffix("-0")?.parse().ok()?;
            let Value::Array(mut fields) = fields else {
                return None;
            };
            let Value::BulkString(data) = fields.pop()? else {
                return None;
            };
            Some((seq, Bytes::from(data)))
        })
        .collect()
}

#[cfg(test)]
mod tests;
