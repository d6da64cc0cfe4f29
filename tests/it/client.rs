//! `herald client` driven through a pipe against the real server, over `ws://` and over
//! `wss://` (a CA and a leaf made by rcgen per run).

use crate::support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use support::Server;

/// `herald client` on `/ws` of a server, its stdin piped and its stdout read line by line.
struct Interactive {
    process: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Interactive {
    fn start(server: &Server) -> Self {
        Self::start_with(&[&format!("ws://{}/ws", server.addr())])
    }

    /// `herald client ARGS`.
    fn start_with(args: &[&str]) -> Self {
        let mut process = Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("client")
            .args(args)
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

#[test]
fn pub_with_an_expected_seq_is_stored_only_on_that_seq() {
    let server = Server::start(&["--threads", "2"]);
    let mut client = Interactive::start(&server);
    writeln!(client.stdin, "/pub state.n =0 1").unwrap();
    assert!(client.wait_for(r#""type":"ack""#).contains(r#""seq":1"#));
    writeln!(client.stdin, "/pub state.n =0 2").unwrap();
    let conflict = client.wait_for(r#""code":"conflict""#);
    assert!(conflict.contains(r#""seq":1"#), "{conflict}");
    writeln!(client.stdin, "/pub state.n =1 2").unwrap();
    assert!(client.wait_for(r#""type":"ack""#).contains(r#""seq":2"#));
    // A new subscriber of the `latest` namespace starts from the value.
    writeln!(client.stdin, "/sub state.n").unwrap();
    let latest = client.wait_for(r#""type":"message""#);
    assert!(latest.contains(r#""seq":2,"data":2"#), "{latest}");
    assert!(client.quit().success());
}

/// A CA, and a TLS server whose leaf for 127.0.0.1 it signed; the CA's PEM in `dir`.
fn tls_server(dir: &std::path::Path) -> Server {
    std::fs::create_dir_all(dir).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "herald client test CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let leaf =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    Server::start(&[
        "--tls-cert",
        dir.join("cert.pem").to_str().unwrap(),
        "--tls-key",
        dir.join("key.pem").to_str().unwrap(),
    ])
}

#[test]
fn interactive_client_speaks_wss_with_the_given_ca() {
    let dir = std::env::temp_dir().join(format!("herald-client-wss-{}", std::process::id()));
    let server = tls_server(&dir);
    let url = format!("wss://127.0.0.1:{}/ws", server.addr().port());
    let ca = dir.join("ca.pem");
    let mut client = Interactive::start_with(&[&url, "--ca", ca.to_str().unwrap()]);
    writeln!(client.stdin, "/sub news").unwrap();
    client.wait_for(r#""type":"subscribed","channel":"news""#);
    // More than one TLS record's worth, to cross record boundaries both ways.
    let big = format!("\"{}\"", "x".repeat(40_000));
    writeln!(client.stdin, "/pub news {big}").unwrap();
    let message = client.wait_for(r#""type":"message""#);
    assert!(
        message.ends_with(&format!(r#""seq":1,"data":{big}}}"#)),
        "{}",
        &message[..80]
    );
    client.wait_for(r#""type":"ack""#);
    writeln!(client.stdin, "/ping").unwrap();
    client.wait_for(r#""type":"pong""#);
    assert!(client.quit().success());

    // Without the CA the certificate is not trusted, and the client says so.
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["client", &url])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("UnknownIssuer") || stderr.contains("invalid peer certificate"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
