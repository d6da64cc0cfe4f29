//! Who a connection is: the token's user, personal channels, the per-user limit.

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

use super::*;
use crate::auth::AuthSettings;
use crate::cluster::users::Verdict;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// Tokens required, signed with [`SECRET`].
pub(super) fn with_tokens(config: Config) -> Config {
    Config {
        auth: AuthSettings {
            secret: Some(SECRET.into()),
            ..AuthSettings::default()
        },
        ..config
    }
}

/// A token of `user` that may subscribe and publish to `channels`, with `info` when
/// given.
pub(super) fn token(user: &str, channels: &[&str], info: Option<&str>) -> String {
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let mut claims =
        serde_json::json!({"sub": user, "exp": exp, "channels": channels, "publish": channels});
    if let Some(info) = info {
        claims["info"] = serde_json::from_str(info).unwrap();
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// An HTTP request for `path` from a new client on `shard`: the response's head line.
fn status_line(cluster: &mut Cluster, shard: usize, path: &str) -> String {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let (_, response) = http(cluster, shard, &request);
    response.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn a_personal_channel_is_its_users_alone_without_being_listed() {
    let mut cluster = Cluster::new(2, with_tokens(Config::default()));
    let ann = cluster.connect(0, &format!("/ws?token={}", token("ann", &[], None)));
    let bob = cluster.connect(1, &format!("/ws?token={}", token("bob", &["*"], None)));
    cluster.send(ann, r#"{"type":"subscribe","channel":"notes#ann","id":1}"#);
    cluster.send(bob, r#"{"type":"subscribe","channel":"notes#ann","id":2}"#);
    cluster.send(ann, r#"{"type":"subscribe","channel":"notes#bob","id":3}"#);
    cluster.settle();
    // The refusal is immediate; the subscription waits for its home.
    let ann_texts = cluster.texts(ann);
    assert!(
        ann_texts[0].contains(r#""code":"forbidden""#) && ann_texts[0].contains(r#""id":3"#),
        "{ann_texts:?}"
    );
    assert!(
        ann_texts[1].starts_with(r#"{"type":"subscribed","channel":"notes#ann""#),
        "{ann_texts:?}"
    );
    let bob_texts = cluster.texts(bob);
    assert!(
        bob_texts[0].contains(r#""code":"forbidden""#),
        "even `*` does not reach another user's channel: {bob_texts:?}"
    );
}

#[test]
fn the_per_user_limit_refuses_with_429_and_frees_the_place_on_close() {
    let config = Config {
        max_connections_per_user: 2,
        ..with_tokens(Config::default())
    };
    let mut cluster = Cluster::new(2, config);
    let ann = token("ann", &["*"], None);
    let first = cluster.connect(0, &format!("/ws?token={ann}"));
    cluster.connect(1, &format!("/ws?token={ann}"));
    let refused = status_line(&mut cluster, 0, &format!("/ws?token={ann}"));
    assert_eq!(refused, "HTTP/1.1 429 Too Many Requests");
    let bob = status_line(
        &mut cluster,
        1,
        &format!("/ws?token={}", token("bob", &[], None)),
    );
    assert_eq!(
        bob, "HTTP/1.1 101 Switching Protocols",
        "other users are not affected"
    );
    cluster.shards[first.shard].handle_eof(first.key);
    let again = status_line(&mut cluster, 0, &format!("/ws?token={ann}"));
    assert_eq!(again, "HTTP/1.1 101 Switching Protocols");
}

#[test]
fn a_namespace_that_exposes_publishers_names_them_in_its_messages_only() {
    let mut config = with_tokens(Config::default());
    config.namespaces.by_prefix.push((
        "chat.".into(),
        crate::namespace::Namespace {
            expose_publisher: true,
            ..config.namespaces.default.clone()
        },
    ));
    let mut cluster = Cluster::new(2, config);
    let ann = cluster.connect(0, &format!("/ws?token={}", token("ann", &["*"], None)));
    let bob = cluster.connect(1, &format!("/ws?token={}", token("bob", &["*"], None)));
    for channel in ["chat.a", "news"] {
        cluster.send(
            bob,
            &format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#),
        );
    }
    cluster.settle();
    cluster.take_output(bob);
    for channel in ["chat.a", "news"] {
        cluster.send(
            ann,
            &format!(r#"{{"type":"publish","channel":"{channel}","data":1}}"#),
        );
    }
    cluster.settle();
    let mut texts = cluster.texts(bob);
    texts.sort();
    assert_eq!(
        texts,
        [
            r#"{"type":"message","channel":"chat.a","seq":1,"publisher":"ann","data":1}"#,
            r#"{"type":"message","channel":"news","seq":1,"data":1}"#,
        ]
    );
}

/// A node whose cluster thread never runs: verdicts on the per-user limit are handed
/// in by the test, as the cluster thread would post them.
fn clustered_with_user_limit() -> Cluster {
    let config = Config {
        max_connections_per_user: 2,
        ..with_tokens(Config::default())
    };
    let mut ctx = Context::new(config, 1, SystemTime::now()).unwrap();
    let (bridge, _idle) = Bridge::new(
        "redis://127.0.0.1:1",
        ctx.config.namespaces.history_policy(),
        ctx.config.redis_ack_replicas,
        ctx.config.redis_buffer_bytes,
        ctx.config.compression.clone(),
    )
    .unwrap();
    ctx.cluster = Some(bridge);
    Cluster::with_context(1, ctx)
}

/// An upgrade as `user` that the shard parks for the cluster's verdict: nothing is
/// answered yet.
fn parked(cluster: &mut Cluster, user: &str) -> (Client, ConnRef) {
    let request = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token(user, &["*"], None)
    );
    let (client, response) = http(cluster, 0, &request);
    assert_eq!(response, "", "parked until the cluster answers");
    let conn = cluster.shards[0].conn_ref(client.key);
    (client, conn)
}

fn verdict(cluster: &mut Cluster, conn: ConnRef, user: &str, verdict: Verdict) {
    let user = user.into();
    let envelope = Envelope::Admitted {
        conn,
        user,
        verdict,
    };
    cluster.shards[0].handle_envelope(envelope);
    cluster.settle();
}

fn head_line(cluster: &mut Cluster, client: Client) -> String {
    let out = String::from_utf8(cluster.take_output(client)).unwrap();
    out.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn in_a_cluster_an_upgrade_waits_for_the_verdict_on_its_user() {
    let mut cluster = clustered_with_user_limit();
    let (ann, conn) = parked(&mut cluster, "ann");
    verdict(&mut cluster, conn, "ann", Verdict::Admitted);
    assert_eq!(
        head_line(&mut cluster, ann),
        "HTTP/1.1 101 Switching Protocols"
    );
    cluster.send(ann, r#"{"type":"ping"}"#);
    assert_eq!(
        cluster.texts(ann),
        [r#"{"type":"pong"}"#],
        "a WebSocket now"
    );

    // Refused by the other nodes' count: the same 429 as on one node.
    let (refused, conn) = parked(&mut cluster, "ann");
    verdict(&mut cluster, conn, "ann", Verdict::Refused);
    let out = String::from_utf8(cluster.take_output(refused)).unwrap();
    assert!(out.starts_with("HTTP/1.1 429 Too Many Requests"), "{out}");
    assert!(out.contains("too_many_connections"), "{out}");

    // Redis did not answer: the node-local count admits it.
    let (unchecked, conn) = parked(&mut cluster, "ann");
    verdict(&mut cluster, conn, "ann", Verdict::Unchecked);
    assert_eq!(
        head_line(&mut cluster, unchecked),
        "HTTP/1.1 101 Switching Protocols"
    );
    // Two places taken on this node: the third is refused here, with no Redis trip.
    let request = format!("/ws?token={}", token("ann", &["*"], None));
    assert_eq!(
        status_line(&mut cluster, 0, &request),
        "HTTP/1.1 429 Too Many Requests"
    );
}

#[test]
fn a_parked_upgrade_keeps_its_deadline_and_a_late_verdict_takes_no_place() {
    let mut cluster = clustered_with_user_limit();
    let (first, conn) = parked(&mut cluster, "ann");
    cluster.now += Config::default().handshake_timeout + Duration::from_millis(1);
    cluster.shards[0].handle_timeout(cluster.now);
    assert_eq!(
        head_line(&mut cluster, first),
        "HTTP/1.1 408 Request Timeout"
    );
    // The verdict comes after the answer: the connection takes no place.
    verdict(&mut cluster, conn, "ann", Verdict::Admitted);
    for _ in 0..2 {
        let (client, conn) = parked(&mut cluster, "ann");
        verdict(&mut cluster, conn, "ann", Verdict::Admitted);
        assert_eq!(
            head_line(&mut cluster, client),
            "HTTP/1.1 101 Switching Protocols",
            "both places are free on this node"
        );
    }
}

#[test]
fn past_the_bound_of_parked_upgrades_the_next_is_answered_503_at_once() {
    let mut cluster = clustered_with_user_limit();
    for i in 0..cluster::users::MAX_QUEUED_ADMISSIONS {
        parked(&mut cluster, &format!("u{i}"));
    }
    let request = format!("/ws?token={}", token("one-too-many", &["*"], None));
    let request = format!(
        "GET {request} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let (_, response) = http(&mut cluster, 0, &request);
    assert!(
        response.starts_with("HTTP/1.1 503 Service Unavailable"),
        "{response}"
    );
    assert!(response.contains(r#""code":"unavailable""#), "{response}");
    assert!(response.contains("Retry-After: "), "{response}");
}

#[test]
fn a_parked_upgrade_counts_its_head_against_what_may_wait_behind_it() {
    let mut cluster = clustered_with_user_limit();
    let (client, _) = parked(&mut cluster, "ann");
    let shard = &mut cluster.shards[0];
    assert!(shard.wants_read(client.key));
    let budget = Config::default().max_head_bytes;
    // The parked head holds a few hundred bytes: fewer than a whole head may follow.
    shard
        .read_buffer(client.key)
        .extend_from_slice(&vec![b'x'; budget - 200]);
    shard.handle_read(client.key, cluster.now);
    assert!(
        !shard.wants_read(client.key),
        "reading pauses at the budget"
    );
}
