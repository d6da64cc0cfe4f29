//! Presence and join/leave, kept by each channel's home.

use super::identity::{token, with_tokens};
use super::*;

fn presence_config(join_leave: bool) -> Config {
    let mut config = with_tokens(Config::default());
    config.namespaces.default.presence = true;
    config.namespaces.default.join_leave = join_leave;
    config
}

/// A WebSocket client of `user` (with `info`) on `shard`, subscribed to `channel`, its
/// output taken.
fn member(
    cluster: &mut Cluster,
    shard: usize,
    user: &str,
    info: Option<&str>,
    channel: &str,
) -> Client {
    let client = cluster.connect(shard, &format!("/ws?token={}", token(user, &["*"], info)));
    cluster.send(
        client,
        &format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#),
    );
    cluster.settle();
    cluster.take_output(client);
    client
}

fn ask(cluster: &mut Cluster, client: Client, json: &str) -> serde_json::Value {
    cluster.send(client, json);
    cluster.settle();
    let texts = cluster.texts(client);
    assert_eq!(texts.len(), 1, "{texts:?}");
    serde_json::from_str(&texts[0]).unwrap()
}

#[test]
fn presence_lists_every_shards_members_in_pages_and_counts_users() {
    let mut cluster = Cluster::new(3, presence_config(false));
    let channel = homed_on(1, 3);
    let ann = member(&mut cluster, 0, "ann", Some(r#"{"name":"Ann"}"#), &channel);
    member(&mut cluster, 2, "ann", None, &channel);
    member(&mut cluster, 1, "bob", None, &channel);
    let stats = ask(
        &mut cluster,
        ann,
        &format!(r#"{{"type":"presence_stats","channel":"{channel}","id":7}}"#),
    );
    assert_eq!(
        stats,
        serde_json::json!({"type":"presence_stats","channel":channel,"connections":3,"users":2,"id":7})
    );
    let mut seen = Vec::new();
    let mut cursor = serde_json::Value::Null;
    loop {
        let page = ask(
            &mut cluster,
            ann,
            &format!(
                r#"{{"type":"presence","channel":"{channel}","limit":2,"cursor":{cursor},"id":8}}"#
            ),
        );
        assert_eq!(page["id"], 8);
        let members = page["members"].as_array().unwrap();
        assert!(members.len() <= 2);
        seen.extend(members.iter().cloned());
        cursor = page["cursor"].clone();
        if cursor.is_null() {
            break;
        }
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    let ann_first = format!("0.{}.", ann.key);
    let listed = seen
        .iter()
        .find(|m| m["conn"].as_str().unwrap().starts_with(&ann_first))
        .unwrap();
    assert_eq!(listed["user"], "ann");
    assert_eq!(listed["info"], serde_json::json!({"name":"Ann"}));
}

#[test]
fn joins_and_leaves_arrive_in_their_place_among_the_messages() {
    let mut cluster = Cluster::new(3, presence_config(true));
    let channel = homed_on(2, 3);
    let watcher = member(&mut cluster, 0, "ann", None, &channel);
    let publish = |cluster: &mut Cluster, n: u32| {
        cluster.send(
            watcher,
            &format!(r#"{{"type":"publish","channel":"{channel}","data":{n}}}"#),
        );
    };
    // Everything leaves shard 0 in one batch, so the home sees it in this order, and so
    // must the watcher.
    publish(&mut cluster, 1);
    let bob = cluster.connect(0, &format!("/ws?token={}", token("bob", &["*"], None)));
    cluster.send(
        bob,
        &format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#),
    );
    publish(&mut cluster, 2);
    cluster.shards[0].handle_eof(bob.key);
    publish(&mut cluster, 3);
    cluster.settle();
    let kinds: Vec<String> = cluster
        .texts(watcher)
        .iter()
        .filter(|t| !t.contains(r#""type":"ack""#))
        .map(|t| {
            let v: serde_json::Value = serde_json::from_str(t).unwrap();
            match v["type"].as_str().unwrap() {
                "message" => format!("m{}", v["data"]),
                kind => format!("{kind}:{}", v["user"].as_str().unwrap()),
            }
        })
        .collect();
    assert_eq!(kinds, ["m1", "join:bob", "m2", "leave:bob", "m3"]);
}

#[test]
fn presence_needs_permission_and_the_namespace_on() {
    let mut cluster = Cluster::new(2, with_tokens(Config::default()));
    let ann = cluster.connect(0, &format!("/ws?token={}", token("ann", &["news"], None)));
    let off = ask(
        &mut cluster,
        ann,
        r#"{"type":"presence","channel":"news","id":1}"#,
    );
    assert_eq!(off["code"], "presence_disabled");
    let forbidden = ask(
        &mut cluster,
        ann,
        r#"{"type":"presence_stats","channel":"secret","id":2}"#,
    );
    assert_eq!(forbidden["code"], "forbidden");
    let bad_cursor = {
        let mut cluster = Cluster::new(1, presence_config(false));
        let ann = member(&mut cluster, 0, "ann", None, "c");
        ask(
            &mut cluster,
            ann,
            r#"{"type":"presence","channel":"c","cursor":"x","id":3}"#,
        )
    };
    assert_eq!(bad_cursor["code"], "bad_request");
}

#[test]
fn members_go_with_their_connections_and_the_channel_with_the_last() {
    let mut cluster = Cluster::new(2, presence_config(true));
    let channel = homed_on(1, 2);
    let clients: Vec<Client> = (0..4)
        .map(|i| member(&mut cluster, i % 2, &format!("u{i}"), None, &channel))
        .collect();
    for client in &clients {
        cluster.shards[client.shard].handle_eof(client.key);
    }
    cluster.settle();
    assert!(cluster.shards[1].channels.is_empty(), "nothing kept");
}

#[test]
fn a_connection_asks_one_question_at_a_time() {
    let mut cluster = Cluster::new(2, presence_config(false));
    let channel = homed_on(1, 2);
    let ann = member(&mut cluster, 0, "ann", None, &channel);
    let ask = |id: u32| format!(r#"{{"type":"presence_stats","channel":"{channel}","id":{id}}}"#);
    let mut batch = Vec::new();
    for id in 1..=3 {
        batch.extend(encode_client_frame(
            OpCode::Text,
            true,
            ask(id).as_bytes(),
            [1, 2, 3, 4],
        ));
    }
    cluster.write(ann, &batch);
    cluster.settle();
    let answered = |cluster: &mut Cluster| -> Vec<u64> {
        cluster
            .texts(ann)
            .iter()
            .map(|t| {
                serde_json::from_str::<serde_json::Value>(t).unwrap()["id"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(answered(&mut cluster), [1], "the others wait, unread");
    for expect in [2, 3] {
        assert!(cluster.shards[0].resume_read(ann.key));
        let now = cluster.now;
        cluster.shards[0].handle_read(ann.key, now);
        cluster.settle();
        assert_eq!(answered(&mut cluster), [expect]);
    }
}

#[test]
fn event_streams_are_members_and_polls_are_not() {
    let mut cluster = Cluster::new(2, presence_config(false));
    let ann = member(&mut cluster, 0, "ann", None, "c");
    let get = |path: String| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    http(
        &mut cluster,
        1,
        &get(format!(
            "/sse?channel=c&token={}",
            token("bob", &["c"], None)
        )),
    );
    http(
        &mut cluster,
        0,
        &get(format!(
            "/poll?channel=c&token={}",
            token("cid", &["c"], None)
        )),
    );
    let stats = ask(
        &mut cluster,
        ann,
        r#"{"type":"presence_stats","channel":"c","id":1}"#,
    );
    assert_eq!(
        (stats["connections"].as_u64(), stats["users"].as_u64()),
        (Some(2), Some(2))
    );
}
