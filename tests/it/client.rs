//! `herald client` driven through a pipe against the real server.

use crate::support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::Server;

/// `herald client` on `/ws` of a server, its stdin piped and its stdout read line by line.
struct Interactive {
    process: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Interactive {
    fn start(server: &Server) -> Self {
        let mut process = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["client", &format!("ws://{}/ws", server.addr())])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start herald client");
        let stdin = process.stdin.take().unwrap();
        let stdout = process.stdout.take().unwrap();
        let (lines_tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            process,
            stdin,
            lines,
        }
    }

    /// The next line containing `needle`; panics after 10 s without one.
    fn wait_for(&self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no line containing {needle:?} within 10 s"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// `/quit`, then how the client exited.
    fn quit(mut self) -> ExitStatus {
        writeln!(self.stdin, "/quit").unwrap();
        drop(self.stdin);
        self.process.wait().unwrap()
    }
}

#[test]
fn interactive_client_subscribes_publishes_and_prints_messages() {
    let server = Server::start(&["--threads", "2"]);
    let mut client = Interactive::start(&server);

    writeln!(client.stdin, "/sub news").unwrap();
    client.wait_for(r#""type":"subscribed","channel":"news""#);
    writeln!(client.stdin, r#"/pub news {{"hello": "pipe"}}"#).unwrap();
    let message = client.wait_for(r#""type":"message""#);
    assert_eq!(
        message,
        r#"< {"type":"message","channel":"news","seq":1,"data":{"hello": "pipe"}}"#
    );
    client.wait_for(r#""type":"ack""#);
    writeln!(client.stdin, r#"{{"type":"nope"}}"#).unwrap();
    client.wait_for(r#""code":"unknown_type""#);
    let status = client.quit();
    assert!(status.success(), "{status}");
}

#[test]
fn interactive_client_asks_for_presence_and_history() {
    let server = Server::start(&["--threads", "2", "--presence"]);
    let mut client = Interactive::start(&server);
    writeln!(client.stdin, "/sub news").unwrap();
    client.wait_for(r#""type":"subscribed""#);
    for n in 1..=3 {
        writeln!(client.stdin, "/pub news {n}").unwrap();
        client.wait_for(r#""type":"ack""#);
    }
    writeln!(client.stdin, "/presence news").unwrap();
    let presence = client.wait_for(r#""type":"presence""#);
    assert!(
        presence.contains(r#""members":[{"user":null,"conn":"#),
        "{presence}"
    );
    writeln!(client.stdin, "/history news 2").unwrap();
    let history = client.wait_for(r#""type":"history""#);
    assert!(
        history.contains(r#""seq":3,"data":3},{"type":"message","channel":"news","seq":2,"#),
        "{history}"
    );
    assert!(client.quit().success());
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
