//! `herald doctor` against the real machine: what it reports is what `/proc/sys` says, a
//! tiny N passes and an absurd N fails naming the setting that blocks it.

use std::process::{Command, Output};

fn doctor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("doctor")
        .args(args)
        .output()
        .expect("run herald doctor")
}

fn proc_sys(path: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn findings(json: &serde_json::Value) -> &Vec<serde_json::Value> {
    json["findings"].as_array().expect("findings array")
}

fn current<'a>(json: &'a serde_json::Value, name: &str) -> &'a str {
    findings(json)
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no finding {name} in {json}"))["current"]
        .as_str()
        .unwrap()
}

#[test]
fn json_matches_proc_sys() {
    let out = doctor(&["--connections", "100", "--json"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(json["connections"], 100);
    for (name, path) in [
        ("net.core.somaxconn", "net/core/somaxconn"),
        ("fs.nr_open", "fs/nr_open"),
        (
            "net.ipv4.tcp_max_syn_backlog",
            "net/ipv4/tcp_max_syn_backlog",
        ),
        ("net.core.netdev_max_backlog", "net/core/netdev_max_backlog"),
        ("net.ipv4.tcp_mem", "net/ipv4/tcp_mem"),
    ] {
        let want = proc_sys(path).unwrap_or_else(|| "unreadable".to_owned());
        assert_eq!(current(&json, name), want, "{name}");
    }
    let range = proc_sys("net/ipv4/ip_local_port_range").unwrap();
    assert!(current(&json, "net.ipv4.ip_local_port_range").starts_with(&range));
    if let Some(ct) = proc_sys("net/netfilter/nf_conntrack_max") {
        assert_eq!(current(&json, "net.netfilter.nf_conntrack_max"), ct);
    }
    for f in findings(&json) {
        for key in ["name", "current", "needed", "fix", "severity"] {
            assert!(f.get(key).is_some(), "{key} missing in {f}");
        }
    }
    let avail = json["memory"]["available"].as_u64().unwrap();
    assert!(avail > 0);
}

#[test]
fn tiny_n_passes() {
    let out = doctor(&["--connections", "10"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("hold 10 connections? yes"), "{stdout}");
}

#[test]
fn absurd_n_fails_naming_the_blocker() {
    let out = doctor(&["--connections", "1000000000"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    // A billion descriptors is beyond any nr_open, and a billion connections beyond memory.
    assert!(stdout.contains("BLOCKER  fs.nr_open"), "{stdout}");
    assert!(stdout.contains("BLOCKER  memory"), "{stdout}");
    assert!(stdout.contains("sysctl -w fs.nr_open="), "{stdout}");

    let out = doctor(&["--connections", "1000000000", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ok"], false);
    assert!(
        findings(&json)
            .iter()
            .any(|f| f["name"] == "fs.nr_open" && f["severity"] == "blocker")
    );
}

#[test]
fn tls_and_per_connection_compression_add_their_memory() {
    let memory = |args: &[&str]| {
        let out = doctor(&[&["--connections", "1000", "--json"], args].concat());
        let json: serde_json::Value =
            serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
        json["memory"].clone()
    };
    let plain = memory(&[]);
    assert_eq!(
        (plain["tls"].as_u64(), plain["compressors"].as_u64()),
        (Some(0), Some(0))
    );
    let both = memory(&["--tls", "--compression", "per-connection"]);
    // 8 KB of TLS session state and a 160 KiB compressor for each of 1,000 connections.
    assert_eq!(both["tls"], 8_192_000);
    assert_eq!(both["compressors"], 163_840_000);
    assert_eq!(
        both["busy_high"].as_u64().unwrap(),
        plain["busy_high"].as_u64().unwrap() + 8_192_000 + 163_840_000
    );
}

/// The io_uring line says which backend `--io auto` will serve on: io_uring here, epoll
/// with the reason and what allows it under a seccomp filter that blocks `io_uring_setup`.
#[test]
fn io_uring_line_names_the_backend_auto_serves_on() {
    let json = |cmd: &mut Command| -> serde_json::Value {
        let out = cmd.output().expect("run herald doctor");
        serde_json::from_slice(&out.stdout).expect("one JSON object")
    };
    let doctor_json = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(["doctor", "--connections", "100", "--json"]);
        cmd
    };
    herald::backend::uring::probe().expect("these tests run where io_uring works");
    let here = json(&mut doctor_json());
    assert_eq!(
        current(&here, "io_uring"),
        "available: --io auto serves on io_uring"
    );
    let mut blocked = doctor_json();
    crate::support::block_io_uring_setup(&mut blocked);
    let blocked = json(&mut blocked);
    let line = current(&blocked, "io_uring");
    assert!(
        line.starts_with("io_uring is unavailable: io_uring_setup failed: Operation not permitted")
            && line.ends_with("--io auto serves on epoll"),
        "{line}"
    );
    assert_eq!(blocked["ok"], true, "epoll serves the connections");
}
