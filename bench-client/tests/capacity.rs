//! Capacity planning end to end: `sweep` against the real server over a grid that crosses
//! the server's per-address cap (the bench spreads over source addresses by itself and
//! says so).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod support;

use support::{BENCH, herald_binary, start};

/// `herald-bench sweep ARGS --json`: the report and the progress lines.
fn sweep(args: &[&str]) -> (Value, String) {
    let output = Command::new(BENCH)
        .args(["sweep", "--json"])
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
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    let pid = server.child.id().to_string();
    let html = Path::new(env!("CARGO_TARGET_TMPDIR")).join("capacity-report.html");
    let (report, stderr) = sweep(&[
        "--url",
        &url,
        "--server-pid",
        &pid,
        "--report",
        html.to_str().unwrap(),
        "--conns",
        "200,1200",
        "--rate",
        "10",
        "--duration",
        "1",
        "--pause",
        "0.2",
        "--drain-timeout",
        "20",
        "--slo-p99",
        "10000",
    ]);
    let points = report["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    for point in points {
        assert!(point["error"].is_null(), "{point}");
        assert_eq!(point["failed_connects"], 0, "{point}");
        assert_eq!(point["lost"], 0, "{point}");
        assert!(point["meets_slo"].as_bool().unwrap(), "{point}");
        assert!(rss_per_conn(point) > 0.0, "{point}");
    }
    assert!(
        report["memory"]
            .as_str()
            .unwrap()
            .contains("before the first point")
    );
    check_capacity_chart(&std::fs::read_to_string(&html).unwrap());
    screenshot(&html);
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

/// A limit the bench cannot get round is named: the status, what it means and the
/// option that raises it (here the server's total, which also refuses the publisher).
#[test]
fn sweep_names_the_limit_that_refused_and_the_option_that_raises_it() {
    let server = start(
        &herald_binary(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--max-connections",
            "100",
        ],
    );
    let url = format!("ws://127.0.0.1:{}/ws", server.port);
    let (report, _) = sweep(&[
        "--url",
        &url,
        "--conns",
        "150",
        "--duration",
        "1",
        "--connect-retries",
        "0",
    ]);
    // Subscribers past the limit are counted under the refusal; a publisher refused as
    // well ends the point with the same words.
    let point = &report["points"][0];
    let mut reasons: Vec<&str> = point["connect_failures"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    reasons.extend(point["error"].as_str());
    assert!(
        reasons.iter().any(|reason| {
            reason.contains("http 503 retry_later: the server is at its connection limit")
                && reason.contains("raise the server's --max-connections)")
        }),
        "{point}"
    );
}

/// A point's server RSS per connection, which must be there.
fn rss_per_conn(point: &Value) -> f64 {
    point["server_rss_bytes_per_conn"]
        .as_f64()
        .unwrap_or_else(|| panic!("no RSS per connection: {point}"))
}

/// With `--server-cmd` every point gets a fresh server, so a smaller point after a larger
/// one is measured too; each fresh server teaches the bench its per-address cap again.
#[test]
fn sweep_with_a_server_per_point_measures_memory_at_every_point() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let command = format!(
        "{} serve --listen 127.0.0.1:{port} --threads 1 --max-connections-per-ip 500",
        herald_binary().display()
    );
    let url = format!("ws://127.0.0.1:{port}/ws");
    let (report, _) = sweep(&[
        "--url",
        &url,
        "--server-cmd",
        &command,
        "--conns",
        "600,200",
        "--rate",
        "10",
        "--duration",
        "1",
        "--pause",
        "0",
        "--drain-timeout",
        "20",
        "--slo-p99",
        "10000",
    ]);
    let points = report["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    for point in points {
        assert!(point["error"].is_null(), "{point}");
        assert_eq!(point["failed_connects"], 0, "{point}");
        assert!(rss_per_conn(point) > 0.0, "{point}");
    }
    assert!(points[0]["spread"]["per_address_cap"].as_u64().unwrap() <= 500);
    assert!(report["memory"].as_str().unwrap().contains("fresh server"));
    let pids: Vec<&Value> = report["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| &run["server"]["pids"][0])
        .collect();
    assert_ne!(pids[0], pids[1], "a server per point");
}

/// The report's capacity chart: one SVG with the latency panel (p99 and p99.9 of the one
/// rate-and-size line, the objective, the largest passing point) beside deliveries/s and
/// CPU per delivery.
fn check_capacity_chart(html: &str) {
    let start = html
        .find("<svg id=\"capacity\"")
        .expect("the capacity chart");
    let svg = &html[start..start + html[start..].find("</svg>").unwrap()];
    for text in [
        "p99 (solid) and p99.9 (dashed) against connections",
        "SLO: p99 &lt;= 10000 ms",
        "largest passing: 1200 conns, 10 msg/s, 64 B",
        "10 msg/s, 64 B",
        "deliveries per second",
        "server CPU per delivery",
    ] {
        assert!(svg.contains(text), "{text} missing from the capacity chart");
    }
    // The objective, p99 and p99.9 in the latency panel, one line in each side panel.
    assert!(svg.matches("<polyline").count() >= 4, "{svg}");
    // The picture first: before the per-run plots and the per-run tables.
    assert!(html.find("<svg id=\"capacity\"") < html.find("latency by percentile"));
    assert!(html.find("<svg id=\"capacity\"") < html.find("fanout: "));
}

/// Keeps a picture of the report beside it (target/tmp/capacity-report.png) for a person
/// to look at, where Chromium is installed.
fn screenshot(html: &Path) {
    let png = html.with_extension("png");
    let output = Command::new("timeout")
        .args([
            "60",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--hide-scrollbars",
        ])
        .arg(format!("--screenshot={}", png.display()))
        .args(["--window-size=1000,1500"])
        .arg(format!("file://{}", html.display()))
        .output();
    match output {
        Ok(output) if output.status.success() => eprintln!("screenshot: {}", png.display()),
        _ => eprintln!("no screenshot of {} (no chromium)", html.display()),
    }
}

/// `plan` on a sweep recorded on this repository's 2-core machine (the worked example of
/// tuning/README.md §8): it stands on the largest 64 B point that met the objective and
/// shows the documented arithmetic.
#[test]
fn plan_from_a_recorded_sweep_gives_the_documented_arithmetic() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sweep.json");
    let plan_args = [
        "plan",
        "--connections",
        "1000000",
        "--rate",
        "5",
        "--size",
        "64",
        "--channels",
        "100",
        "--slo-p99",
        "50",
        "--from",
        fixture,
        "--cores",
        "16",
        "--memory-gib",
        "64",
    ];
    let run = |json: bool| {
        let output = Command::new(BENCH)
            .args(plan_args)
            .args(json.then_some("--json"))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let plan: Value = serde_json::from_str(run(true).trim()).unwrap();
    let sweep: Value = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();

    // The basis: of the points meeting p99 <= 50 ms with nothing lost, the most deliveries.
    let basis = &plan["basis"];
    let passing = sweep["points"].as_array().unwrap().iter().filter(|p| {
        p["error"].is_null()
            && p["p99_us"].as_u64().unwrap() <= 50_000
            && p["lost"] == 0
            && p["failed_connects"] == 0
    });
    let best = passing
        .max_by(|a, b| {
            let load = |p: &Value| p["conns"].as_f64().unwrap() * p["rate"].as_f64().unwrap();
            load(a).total_cmp(&load(b))
        })
        .unwrap();
    assert_eq!(basis["conns"], best["conns"]);
    assert_eq!(basis["rate"], best["rate"]);
    let cpu_ns = best["server_cpu_ns_per_delivery"].as_f64().unwrap();
    let rss = best["server_rss_bytes_per_conn"].as_f64().unwrap();

    // CPU: 5 msg/s x 10,000 subscribers per message = 50,000 deliveries/s x c, over 70%;
    // burst: 10,000 x c within 50 ms.
    let close = |key: &str, expected: f64| {
        let got = plan[key].as_f64().unwrap();
        assert!(
            (got - expected).abs() <= expected * 1e-9,
            "{key}: {got} != {expected}"
        );
    };
    close("deliveries_per_second", 50_000.0);
    close("busy_cores", 50_000.0 * cpu_ns / 1e9);
    close("cores_for_utilisation", 50_000.0 * cpu_ns / 1e9 / 0.7);
    close("cores_for_burst", 10_000.0 * cpu_ns / 50e6);
    let cores = (50_000.0 * cpu_ns / 1e9 / 0.7)
        .max(10_000.0 * cpu_ns / 50e6)
        .ceil();
    assert_eq!(plan["cores"].as_f64().unwrap(), cores);
    // Memory: measured RSS + 4,096 B kernel structures + 8,192 B of busy socket buffers.
    let per_conn = rss.ceil() + 4_096.0 + 8_192.0;
    assert_eq!(plan["memory_bytes"].as_f64().unwrap(), per_conn * 1e6);
    let machine = 64.0 * f64::from(1u32 << 30);
    let machines = (cores / 16.0).max(per_conn * 1e6 / 0.7 / machine).ceil();
    assert_eq!(plan["machines"].as_f64().unwrap(), machines);
    close(
        "cpu_margin",
        1.0 - 50_000.0 * cpu_ns / 1e9 / (machines * 16.0),
    );
    close("burst_ms", 10_000.0 / machines * cpu_ns / 16.0 / 1e6);

    let text = run(false);
    for line in [
        "5 msg/s x 10000 subscribers per message = 50000/s",
        &format!("50000/s x {cpu_ns:.0} ns per delivery ="),
        &format!("10000 subscribers x {cpu_ns:.0} ns / 50 ms ="),
        &format!("one machine needs {cores} cores"),
        "extrapolated (not measured):",
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
}
