//! How `herald serve` is run: several processes on one port with `--shared-port`, and
//! each option's precedence (command line, environment, `--config` file, default),
//! checked on the real binary through behaviour a client sees.

use crate::support;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// Two processes with `--shared-port` on one port both take connections (each start is
/// its own epoch, which every `subscribed` reply names); a third without the flag cannot
/// bind the port at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_with_shared_port_both_serve_one_port() {
    let mut first = Server::start(&["--shared-port"]);
    let listen = first.addr().to_string();
    let mut second = Server::start_listening(&listen, &["--shared-port"]);
    assert_eq!(second.addr(), first.addr());

    // The kernel spreads connections over both processes' listeners by their address
    // hash: 40 connections all landing on one of two processes would be a 1 in 2^39 event.
    let mut epochs = HashSet::new();
    for i in 0..40 {
        let mut ws = connect_ws(first.addr()).await;
        let reply = subscribe(&mut ws, "where", i).await;
        epochs.insert(reply["epoch"].as_str().expect("epoch").to_owned());
        ping_pong(&mut ws).await;
    }
    assert_eq!(
        epochs.len(),
        2,
        "connections to the shared port reached {} process(es)",
        epochs.len()
    );

    let mut taken = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--threads", "1", "--listen", &listen])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start herald");
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let status = loop {
        if let Some(status) = taken.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = taken.kill();
            panic!("a process without --shared-port started on a port in use");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !status.success(),
        "without --shared-port the bind must fail"
    );
    first.assert_healthy();
    second.assert_healthy();
}

/// Publishes `count` messages on `channel` and returns what a `since=0` subscribe gets:
/// `Ok(replayed seqs)` or `Err(oldest)` for a `history_gap`.
async fn history_after(server: &Server, channel: &str, count: u64) -> Result<Vec<u64>, u64> {
    let mut publisher = connect_ws(server.addr()).await;
    for i in 1..=count {
        publish_raw(&mut publisher, channel, &i.to_string(), i).await;
    }
    let mut ws = connect_ws(server.addr()).await;
    send_json(
        &mut ws,
        &json!({"type":"subscribe","channel":channel,"since":0,"id":1}),
    )
    .await;
    let mut replayed = Vec::new();
    loop {
        let v = recv_json(&mut ws).await;
        match v["type"].as_str() {
            Some("message") => replayed.push(v["seq"].as_u64().expect("seq")),
            Some("subscribed") => return Ok(replayed),
            Some("error") if v["code"] == "history_gap" => {
                return Err(v["oldest"].as_u64().expect("oldest"));
            }
            _ => panic!("unexpected {v}"),
        }
    }
}

/// README: command line, then environment, then `--config FILE`, then the default. The
/// history size shows which one won: 6 published, a history of N keeps the last N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_beats_environment_which_beats_the_config_file() {
    let dir = std::env::temp_dir().join(format!("herald-precedence-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("herald.toml");
    std::fs::write(&file, "history_size = 5\n").expect("write config");
    let file = file.to_str().expect("utf-8 path");

    let from_file = Server::start(&["--config", file]);
    assert_eq!(
        history_after(&from_file, "p", 6).await,
        Err(2),
        "the file's 5"
    );

    let from_env = Server::start_with_env(&[("HERALD_HISTORY_SIZE", "2")], &["--config", file]);
    assert_eq!(
        history_after(&from_env, "p", 6).await,
        Err(5),
        "the environment's 2 over the file's 5"
    );

    let from_flag = Server::start_with_env(
        &[("HERALD_HISTORY_SIZE", "2")],
        &["--config", file, "--history-size", "3"],
    );
    assert_eq!(
        history_after(&from_flag, "p", 6).await,
        Err(4),
        "the command line's 3 over the environment's 2"
    );

    let default = Server::start(&[]);
    assert_eq!(
        history_after(&default, "p", 6).await,
        Ok(vec![1, 2, 3, 4, 5, 6]),
        "the default 100 holds all 6"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
