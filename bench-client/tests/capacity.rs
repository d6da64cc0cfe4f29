//! Capacity planning end to end: `sweep` against the real server over a grid that crosses
//! the server's per-address cap (the bench spreads over source addresses by itself and
//! says so).

use std::process::Command;

use serde_json::Value;

mod support;

use support::{BENCH, Server, herald_binary, start};

/// `herald-bench sweep ARGS --json` against `server`: the report and the progress lines.
fn sweep(server: &Server, args: &[&str]) -> (Value, String) {
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    let pid = server.child.id().to_string();
    let output = Command::new(BENCH)
        .args(["sweep", "--url", &url, "--server-pid", &pid, "--json"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "sweep failed: {stderr}\n{stdout}");
    let report = serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap();
    (report, stderr)
}

#[test]
fn sweep_measures_every_point_past_the_per_address_cap_and_says_how_it_spread() {
    let server = start(
        &herald_binary(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--max-connections-per-ip",
            "500",
        ],
    );
    let (report, stderr) = sweep(
        &server,
        &[
            "--conns",
            "200,1200",
            "--rate",
            "10",
            "--duration",
            "1",
            "--pause",
            "0.2",
            "--drain-timeout",
            "5",
            "--slo-p99",
            "10000",
        ],
    );
    let points = report["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    for point in points {
        assert!(point["error"].is_null(), "{point}");
        assert_eq!(point["failed_connects"], 0, "{point}");
        assert_eq!(point["lost"], 0, "{point}");
        assert!(point["meets_slo"].as_bool().unwrap(), "{point}");
    }
    // 200 fit on one address; 1,200 need at least three under a cap of 500.
    assert!(points[0]["spread"]["per_address_cap"].is_null());
    let spread = &points[1]["spread"];
    assert!(spread["addresses"].as_u64().unwrap() >= 3, "{spread}");
    assert!(
        spread["per_address_cap"].as_u64().unwrap() <= 500,
        "{spread}"
    );
    assert!(
        stderr.contains("spread 1200 connections over")
            && stderr.contains("--max-connections-per-ip"),
        "{stderr}"
    );
}
