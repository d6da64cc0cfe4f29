//! Runs `herald-bench fanout` against the real `herald` binary and against `floor`, and checks
//! that nothing is lost, duplicated or reordered and that the JSON has its documented shape;
//! and `floor`'s heartbeat, the reference for what an idle connection costs: each upgraded
//! client is pinged once per interval, on its phase, and never more often.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;

use support::{BENCH, Server, herald_binary, start};

fn fanout(server: &Server, extra: &[&str]) -> Value {
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    fanout_to(server, &url, &[], extra)
}

/// `fanout` against `url` with extra environment variables.
fn fanout_to(server: &Server, url: &str, env: &[(&str, &str)], extra: &[&str]) -> Value {
    let pid = server.child.id().to_string();
    let output = Command::new(BENCH)
        .envs(env.iter().copied())
        .args(["fanout", "--url", url, "--server-pid", &pid, "--json", "-q"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "herald-bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap()
}

fn assert_complete(report: &Value, conns: u64) {
    assert_eq!(report["mode"], "fanout");
    assert_eq!(report["connect"]["attempted"], conns);
    assert_eq!(report["connect"]["ok"], conns, "{}", report["connect"]);
    assert_eq!(report["connect"]["failed"], 0);
    let published = report["published"].as_u64().unwrap();
    assert!(published > 0);
    assert_eq!(report["acked"], published);
    let deliveries = &report["deliveries"];
    assert!(deliveries["expected"].as_u64().unwrap() > 0);
    assert_eq!(
        deliveries["received"], deliveries["expected"],
        "{deliveries}"
    );
    assert_eq!(deliveries["lost"], 0);
    assert_eq!(deliveries["duplicated"], 0);
    assert_eq!(deliveries["out_of_order"], 0);
    assert!(deliveries["per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(report["latency_us"]["count"], deliveries["received"]);
    for key in ["p50", "p90", "p99", "p999", "p9999", "max", "mean"] {
        assert!(report["latency_us"][key].is_number(), "latency_us.{key}");
    }
    let timeline = report["timeline"].as_array().unwrap();
    assert!(!timeline.is_empty());
    let timeline_total: u64 = timeline
        .iter()
        .map(|point| point["deliveries"].as_u64().unwrap())
        .sum();
    assert_eq!(timeline_total, deliveries["received"].as_u64().unwrap());
    assert!(timeline[0]["p99_us"].is_number() && timeline[0]["t"].is_number());
    let curve = report["percentile_curve"].as_array().unwrap();
    assert_eq!(curve.last().unwrap()["q"], 1.0);
    let server = &report["server"];
    for key in [
        "cpu_ns",
        "cpu_ns_per_delivery",
        "rss_bytes_before",
        "rss_bytes_after",
        "rss_bytes_per_conn",
    ] {
        assert!(server[key].is_number(), "server.{key}");
    }
    assert!(server["rss_bytes_before"].as_u64().unwrap() > 0);
    assert!(report["client"]["cpu_ns_per_delivery"].as_f64().unwrap() > 0.0);
    assert_eq!(report["config"]["conns"], conns);
}

#[test]
fn herald_delivers_every_message_once_in_order_to_every_subscriber() {
    let server = start(
        &herald_binary(),
        &["serve", "--listen", "127.0.0.1:0", "--threads", "2"],
    );
    let report = fanout(
        &server,
        &[
            "--conns",
            "300",
            "--rate",
            "40",
            "--duration",
            "2",
            "--channels",
            "2",
            "--procs",
            "2",
        ],
    );
    assert_complete(&report, 300);
    assert_eq!(report["deliveries"]["expected"], 80 * 150);
    assert_eq!(report["client"]["procs"], 2);
}

#[test]
fn floor_server_runs_fanout_unchanged() {
    let server = start(&PathBuf::from(BENCH), &["floor", "--listen", "127.0.0.1:0"]);
    let report = fanout(
        &server,
        &[
            "--conns",
            "200",
            "--rate",
            "50",
            "--duration",
            "1",
            "--size",
            "200",
        ],
    );
    assert_complete(&report, 200);
    assert_eq!(report["deliveries"]["expected"], 50 * 200);
}

#[test]
fn echo_reports_the_servers_cpu_per_message() {
    let server = start(
        &herald_binary(),
        &["serve", "--listen", "127.0.0.1:0", "--threads", "1"],
    );
    let url = format!("ws://127.0.0.1:{}/echo", server.port);
    let pid = server.child.id();
    let output = Command::new(BENCH)
        .args([
            "echo",
            "--url",
            &url,
            "--conns",
            "20",
            "--duration",
            "1",
            "--json",
            "-q",
        ])
        .args(["--server-pid", &pid.to_string()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "herald-bench echo failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap();
    assert!(report["received"].as_u64().unwrap() > 0, "{report}");
    let server = &report["server"];
    assert_eq!(server["pids"], serde_json::json!([pid]));
    let cpu_ns = server["cpu_ns"].as_f64().unwrap();
    let per_message = server["cpu_ns_per_message"].as_f64().unwrap();
    let received = report["received"].as_f64().unwrap();
    assert!(
        (per_message * received - cpu_ns).abs() <= received,
        "cpu_ns_per_message is cpu_ns / received: {server}"
    );
}

/// A CA and a leaf for localhost it signed, as PEM files in a fresh directory.
fn test_pki(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let dir = std::env::temp_dir().join(format!("herald-bench-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[test]
fn fanout_over_wss_verifies_the_certificate_or_skips_it_with_insecure() {
    let (ca, cert, key) = test_pki("wss");
    let server = start(
        &herald_binary(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "2",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let url = format!("wss://localhost:{}/ws", server.port);
    let run = ["--conns", "100", "--rate", "40", "--duration", "1"];
    let verified = fanout_to(
        &server,
        &url,
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
        &run,
    );
    assert_complete(&verified, 100);
    assert_eq!(verified["deliveries"]["expected"], 40 * 100);
    let mut insecure_run = run.to_vec();
    insecure_run.push("--insecure");
    let insecure = fanout_to(&server, &url, &[], &insecure_run);
    assert_complete(&insecure, 100);
    // Without --insecure a certificate from an unknown CA is refused.
    let refused = Command::new(BENCH)
        .env("SSL_CERT_FILE", cert.to_str().unwrap())
        .args([
            "echo",
            "--url",
            &format!("wss://localhost:{}/echo", server.port),
        ])
        .args(["--duration", "0.5", "--conns", "2", "-q"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("invalid peer certificate"), "{err}");
    let _ = std::fs::remove_dir_all(ca.parent().unwrap());
}

#[test]
fn deflate_inflates_every_message_and_reads_fewer_bytes_per_delivery() {
    let server = start(
        &herald_binary(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "2",
            "--compression",
            "shared",
        ],
    );
    let args = [
        "--conns",
        "100",
        "--rate",
        "20",
        "--duration",
        "1",
        "--size",
        "1024",
    ];
    let plain = fanout(&server, &args);
    let deflated = fanout(&server, &[&args[..], &["--deflate"]].concat());
    for report in [&plain, &deflated] {
        assert_complete(report, 100);
    }
    let wire = |report: &Value| {
        report["client"]["wire_bytes_per_delivery"]
            .as_f64()
            .unwrap()
    };
    assert!(wire(&plain) > 1024.0, "{}", wire(&plain));
    assert!(
        wire(&deflated) < wire(&plain) * 0.7,
        "{} vs {}",
        wire(&deflated),
        wire(&plain)
    );
}

/// `sweep` end to end: every grid point is measured against the real server (nothing
/// lost, duplicated or reordered), the objective marks them, `best` names the largest
/// passing point, and the HTML report overlays the runs. The objective is generous: this
/// checks the sweep's bookkeeping, not the server's speed.
#[test]
fn sweep_measures_every_grid_point_and_names_the_largest_that_meets_the_objective() {
    let server = start(
        &herald_binary(),
        &["serve", "--listen", "127.0.0.1:0", "--threads", "2"],
    );
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    let pid = server.child.id().to_string();
    let report_path =
        std::env::temp_dir().join(format!("herald-sweep-{}.html", std::process::id()));
    let output = Command::new(BENCH)
        .args(["sweep", "--url", &url, "--server-pid", &pid, "--json", "-q"])
        .args(["--conns", "20,60", "--rate", "10,20", "--size", "64"])
        .args(["--duration", "1", "--pause", "0.2", "--slo-p99", "10000"])
        .arg("--report")
        .arg(&report_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "herald-bench sweep failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap();
    assert_eq!(report["mode"], "sweep");
    assert_eq!(report["slo_p99_ms"], 10000.0);
    let points = report["points"].as_array().unwrap();
    let grid: Vec<(u64, f64)> = points
        .iter()
        .map(|p| (p["conns"].as_u64().unwrap(), p["rate"].as_f64().unwrap()))
        .collect();
    assert_eq!(
        grid,
        [(20, 10.0), (20, 20.0), (60, 10.0), (60, 20.0)],
        "the grid in order"
    );
    for point in points {
        assert!(point["error"].is_null(), "{point}");
        for key in ["lost", "duplicated", "out_of_order", "failed_connects"] {
            assert_eq!(point[key], 0, "{key}: {point}");
        }
        assert!(point["p99_us"].as_u64().unwrap() > 0, "{point}");
        assert!(
            point["deliveries_per_second"].as_f64().unwrap() > 0.0,
            "{point}"
        );
        assert!(point["server_cpu_ns_per_delivery"].is_number(), "{point}");
        assert_eq!(point["meets_slo"], true, "{point}");
    }
    assert_eq!(
        report["best"], 3,
        "60 conns at 20 msg/s offers the most deliveries"
    );
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    for (run, (conns, _)) in runs.iter().zip(&grid) {
        assert_complete(run, *conns);
    }
    let html = std::fs::read_to_string(&report_path).expect("the --report file");
    let _ = std::fs::remove_file(&report_path);
    assert!(
        html.contains("herald-bench sweep"),
        "report names the sweep"
    );
}

/// `--publish http` does what `fanout --help` and `sweep --help` say: `POST /api/publish`
/// with the key the server was started with, every subscriber getting every message.
#[test]
fn http_publish_with_the_servers_api_key_reaches_every_subscriber() {
    let server = start(
        &herald_binary(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--api-key",
            "bench-key",
        ],
    );
    let report = fanout(
        &server,
        &[
            "--conns",
            "50",
            "--rate",
            "20",
            "--duration",
            "1",
            "--publish",
            "http",
            "--api-key",
            "bench-key",
        ],
    );
    assert_complete(&report, 50);
    for command in ["fanout", "sweep"] {
        let help = Command::new(BENCH)
            .args([command, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(help.contains("POST /api/publish"), "{help}");
        assert!(!help.contains("no HTTP publish"), "{help}");
    }
}

const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// An upgraded client of the floor on `port`.
fn upgraded(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(UPGRADE.as_bytes()).unwrap();
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        response.push(byte[0]);
    }
    assert!(response.starts_with(b"HTTP/1.1 101"), "{response:?}");
    stream
}

/// When each ping arrived on `stream` during `window`, answering each with a pong.
fn pings_during(stream: &mut TcpStream, window: Duration) -> Vec<Instant> {
    let end = Instant::now() + window;
    let mut pings = Vec::new();
    let mut frame = [0u8; 2];
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match stream.read_exact(&mut frame) {
            Ok(()) => {
                assert_eq!(frame, [0x89, 0x00], "only empty pings are sent");
                pings.push(Instant::now());
                // A masked, empty pong.
                stream.write_all(&[0x8a, 0x80, 1, 2, 3, 4]).unwrap();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading from the floor: {e}"),
        }
    }
    pings
}

/// `herald-bench floor` pinging every `interval_ms` (0: never).
fn floor_pinging_every(interval_ms: &str) -> Server {
    start(
        &PathBuf::from(BENCH),
        &[
            "floor",
            "--listen",
            "127.0.0.1:0",
            "--ping-interval-ms",
            interval_ms,
        ],
    )
}

#[test]
fn floor_pings_each_client_once_an_interval() {
    let server = floor_pinging_every("300");
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let mut client = upgraded(server.port);
            std::thread::spawn(move || pings_during(&mut client, Duration::from_millis(1_500)))
        })
        .collect();
    for handle in handles {
        let pings = handle.join().unwrap();
        // Five intervals: four to six pings, depending on where the phase fell.
        assert!((4..=6).contains(&pings.len()), "{} pings", pings.len());
        for gap in pings.windows(2).map(|w| w[1] - w[0]) {
            assert!(
                gap > Duration::from_millis(200) && gap < Duration::from_millis(450),
                "pings {gap:?} apart, the interval is 300 ms"
            );
        }
    }
}

#[test]
fn floor_sends_no_ping_when_pings_are_off() {
    let server = floor_pinging_every("0");
    let mut client = upgraded(server.port);
    assert!(pings_during(&mut client, Duration::from_millis(500)).is_empty());
}
