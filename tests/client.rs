//! `herald client` driven through a pipe against the real server.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::Server;

#[test]
fn interactive_client_subscribes_publishes_and_prints_messages() {
    let server = Server::start(&["--threads", "2"]);
    let mut client = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["client", &format!("ws://{}/ws", server.addr())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start herald client");
    let mut stdin = client.stdin.take().unwrap();
    let stdout = client.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let wait_for = |needle: &str| -> String {
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no line containing {needle:?} within 10 s"));
            if line.contains(needle) {
                return line;
            }
        }
    };

    writeln!(stdin, "/sub news").unwrap();
    wait_for(r#""type":"subscribed","channel":"news""#);
    writeln!(stdin, r#"/pub news {{"hello": "pipe"}}"#).unwrap();
    let message = wait_for(r#""type":"message""#);
    assert_eq!(
        message,
        r#"< {"type":"message","channel":"news","seq":1,"data":{"hello": "pipe"}}"#
    );
    wait_for(r#""type":"ack""#);
    writeln!(stdin, r#"{{"type":"nope"}}"#).unwrap();
    wait_for(r#""code":"unknown_type""#);
    writeln!(stdin, "/quit").unwrap();
    drop(stdin);
    let status = client.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn interactive_client_asks_for_presence_and_history() {
    let server = Server::start(&["--threads", "2", "--presence"]);
    let mut client = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["client", &format!("ws://{}/ws", server.addr())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start herald client");
    let mut stdin = client.stdin.take().unwrap();
    let stdout = client.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let wait_for = |needle: &str| -> String {
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no line containing {needle:?} within 10 s"));
            if line.contains(needle) {
                return line;
            }
        }
    };
    writeln!(stdin, "/sub news").unwrap();
    wait_for(r#""type":"subscribed""#);
    for n in 1..=3 {
        writeln!(stdin, "/pub news {n}").unwrap();
        wait_for(r#""type":"ack""#);
    }
    writeln!(stdin, "/presence news").unwrap();
    let presence = wait_for(r#""type":"presence""#);
    assert!(
        presence.contains(r#""members":[{"user":null,"conn":"#),
        "{presence}"
    );
    writeln!(stdin, "/history news 2").unwrap();
    let history = wait_for(r#""type":"history""#);
    assert!(
        history.contains(r#""seq":3,"data":3},{"type":"message","channel":"news","seq":2,"#),
        "{history}"
    );
    writeln!(stdin, "/quit").unwrap();
    drop(stdin);
    assert!(client.wait().unwrap().success());
}

#[test]
fn interactive_client_reports_a_refused_upgrade() {
    let server = Server::start(&[]);
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["client", &format!("ws://{}/nope", server.addr())])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("upgrade refused: HTTP/1.1 404"), "{stderr}");
}
