use super::*;

/// A machine set up per tuning/ for a million connections.
fn big() -> Readings {
    Readings {
        nofile_soft: Some(2_097_152),
        nofile_hard: Some(2_097_152),
        nr_open: Some(2_097_152),
        file_max: Some(4_194_304),
        file_nr: Some(2_000),
        somaxconn: Some(65_535),
        tcp_max_syn_backlog: Some(65_535),
        netdev_max_backlog: Some(16_384),
        ip_local_port_range: Some((1024, 65535)),
        tcp_mem: Some([2_000_000, 3_000_000, 4_000_000]),
        tcp_rmem: Some([4096, 16384, 4_194_304]),
        tcp_wmem: Some([4096, 16384, 4_194_304]),
        nf_conntrack_max: None,
        io_uring: Some(Ok(())),
        cores: 32,
        mem_total: Some(64 << 30),
        mem_available: Some(60 << 30),
        page_size: 4096,
    }
}

fn finding<'a>(r: &'a Report, name: &str) -> &'a Finding {
    r.findings.iter().find(|f| f.name == name).unwrap()
}

#[test]
fn tuned_machine_holds_a_million() {
    let r = check(&big(), 1_000_000, Features::default());
    assert!(r.ok, "{r:#?}");
    for f in &r.findings {
        assert!(f.severity <= Severity::Info, "{f:#?}");
    }
}

#[test]
fn hard_limit_and_nr_open_block() {
    let mut m = big();
    m.nofile_hard = Some(65_536);
    m.nr_open = Some(524_288);
    let r = check(&m, 1_000_000, Features::default());
    assert!(!r.ok);
    let hard = finding(&r, "RLIMIT_NOFILE (hard)");
    assert_eq!(hard.severity, Severity::Blocker);
    assert!(hard.fix.contains("LimitNOFILE=1048576"), "{}", hard.fix);
    let nr = finding(&r, "fs.nr_open");
    assert_eq!(nr.severity, Severity::Blocker);
    assert_eq!(nr.fix.split_whitespace().nth(2), Some("fs.nr_open=1048576"));
    // Worst first.
    assert_eq!(r.findings[0].severity, Severity::Blocker);
    // 100k is fine on the same machine apart from the hard limit.
    let r = check(&m, 60_000, Features::default());
    assert!(r.ok, "{r:#?}");
}

#[test]
fn soft_limit_only_warns() {
    let mut m = big();
    m.nofile_soft = Some(1024);
    let r = check(&m, 100_000, Features::default());
    assert!(r.ok);
    let soft = finding(&r, "RLIMIT_NOFILE (soft)");
    assert_eq!(soft.severity, Severity::Warn);
    assert!(soft.fix.starts_with("ulimit -n 131072"), "{}", soft.fix);
}

#[test]
fn file_max_counts_files_already_open() {
    let mut m = big();
    m.file_max = Some(1_100_000);
    m.file_nr = Some(200_000);
    let r = check(&m, 1_000_000, Features::default());
    assert_eq!(finding(&r, "fs.file-max").severity, Severity::Blocker);
    m.file_nr = Some(1_000);
    assert_eq!(
        finding(&check(&m, 1_000_000, Features::default()), "fs.file-max").severity,
        Severity::Ok
    );
}

#[test]
fn backlogs_scale_with_n() {
    let mut m = big();
    m.somaxconn = Some(4096);
    m.tcp_max_syn_backlog = Some(512);
    m.netdev_max_backlog = Some(1000);
    let r = check(&m, 100_000, Features::default());
    assert!(r.ok);
    let s = finding(&r, "net.core.somaxconn");
    assert_eq!(s.severity, Severity::Warn);
    assert!(s.fix.contains("net.core.somaxconn=65535"));
    assert_eq!(
        finding(&r, "net.core.netdev_max_backlog").severity,
        Severity::Warn
    );
    let r = check(&m, 1_000, Features::default());
    assert_eq!(finding(&r, "net.core.somaxconn").severity, Severity::Ok);
    assert_eq!(
        finding(&r, "net.ipv4.tcp_max_syn_backlog").severity,
        Severity::Warn
    );
}

#[test]
fn memory_estimate_and_blocker() {
    let mut m = big();
    m.mem_available = Some(4 << 30);
    let r = check(&m, 1_000_000, Features::default());
    assert_eq!(r.memory.herald, (470_000_000, 1_024_000_000));
    assert_eq!(r.memory.kernel_structures, (2_048_000_000, 4_096_000_000));
    assert_eq!(r.memory.kernel_buffers_busy, 8_192_000_000);
    assert_eq!(r.memory.idle, (2_518_000_000, 5_120_000_000));
    assert_eq!(r.memory.busy_high, 13_312_000_000);
    let mem = finding(&r, "memory");
    assert_eq!(mem.severity, Severity::Blocker);
    assert!(!r.ok);
    // Enough for idle, not for busy: a warning.
    m.mem_available = Some(10 << 30);
    let r = check(&m, 1_000_000, Features::default());
    assert_eq!(finding(&r, "memory").severity, Severity::Warn);
    assert!(r.ok);
}

#[test]
fn tls_and_per_connection_compressors_count_in_the_estimate() {
    let features = Features {
        tls: true,
        compression: CompressionPolicy::PerConnection,
    };
    let r = check(&big(), 1_000_000, features);
    assert_eq!(r.memory.tls, 8_192_000_000);
    assert_eq!(r.memory.compressors, 163_840_000_000);
    assert_eq!(r.memory.idle, (10_710_000_000, 13_312_000_000));
    assert_eq!(
        r.memory.busy_high,
        13_312_000_000 + 8_192_000_000 + 163_840_000_000
    );
    let text = render_text(&r);
    assert!(text.contains("TLS session state") && text.contains("own compressor"));
    let plain = render_text(&check(&big(), 1_000_000, Features::default()));
    assert!(!plain.contains("TLS session state") && !plain.contains("own compressor"));
}

#[test]
fn tcp_mem_in_pages() {
    let mut m = big();
    m.tcp_mem = Some([10_000, 20_000, 30_000]);
    let r = check(&m, 100_000, Features::default());
    let t = finding(&r, "net.ipv4.tcp_mem");
    // 100,000 x 8,192 B / 4,096 B = 200,000 pages.
    assert_eq!(t.severity, Severity::Warn);
    assert!(t.needed.starts_with("high >= 200000 pages"), "{}", t.needed);
    assert!(
        t.fix.contains("tcp_mem=\"100000 200000 400000\""),
        "{}",
        t.fix
    );
    assert_eq!(t.current, "10000 20000 30000");
}

#[test]
fn big_buffer_minimums_warn() {
    let mut m = big();
    m.tcp_rmem = Some([65_536, 131_072, 6_291_456]);
    let r = check(&m, 10_000, Features::default());
    let b = finding(&r, "net.ipv4.tcp_rmem / tcp_wmem");
    assert_eq!(b.severity, Severity::Warn);
    assert!(b.fix.contains("tcp_rmem=\"4096"));
}

#[test]
fn conntrack_only_when_loaded() {
    let mut m = big();
    let r = check(&m, 100_000, Features::default());
    assert!(
        r.findings
            .iter()
            .all(|f| f.name != "net.netfilter.nf_conntrack_max")
    );
    m.nf_conntrack_max = Some(65_536);
    let r = check(&m, 100_000, Features::default());
    let c = finding(&r, "net.netfilter.nf_conntrack_max");
    assert_eq!(c.severity, Severity::Warn);
    assert!(c.fix.contains("notrack"));
}

#[test]
fn unreadable_values_are_info_not_blockers() {
    let m = Readings {
        cores: 1,
        page_size: 4096,
        ..Readings::default()
    };
    let r = check(&m, 100_000, Features::default());
    assert!(r.ok);
    assert!(r.findings.iter().all(|f| f.severity <= Severity::Info));
    assert_eq!(finding(&r, "fs.nr_open").current, "unreadable");
}

#[test]
fn unlimited_shows_as_unlimited() {
    let mut m = big();
    m.nofile_hard = Some(u64::MAX);
    let r = check(&m, 1_000, Features::default());
    let h = finding(&r, "RLIMIT_NOFILE (hard)");
    assert_eq!(h.current, "unlimited");
    assert_eq!(h.severity, Severity::Ok);
}

#[test]
fn meminfo_parsing() {
    let s = "MemTotal:       16334316 kB\nMemFree:  1 kB\nMemAvailable:   8000000 kB\n";
    assert_eq!(meminfo_field(s, "MemTotal"), Some(16_334_316 * 1024));
    assert_eq!(meminfo_field(s, "MemAvailable"), Some(8_000_000 * 1024));
    assert_eq!(meminfo_field(s, "Mem"), None);
}

#[test]
fn text_and_json_render() {
    let mut m = big();
    m.nr_open = Some(1_048_576);
    let r = check(&m, 1_000_000_000, Features::default());
    let text = render_text(&r);
    assert!(text.contains("NO"));
    assert!(text.contains("BLOCKER  fs.nr_open"), "{text}");
    let json = simd_json::to_string(&r).unwrap();
    assert!(json.contains("\"severity\":\"blocker\""), "{json}");
    assert!(json.contains("\"ok\":false"));
}

#[test]
fn io_uring_blocked_is_reported_with_what_allows_it() {
    let mut machine = big();
    let r = check(&machine, 1_000, Features::default());
    let f = finding(&r, "io_uring");
    assert_eq!(f.severity, Severity::Ok);
    assert!(f.current.contains("serves on io_uring"), "{f:#?}");
    machine.io_uring = Some(Err(
        "io_uring is unavailable: io_uring_setup failed".to_owned()
    ));
    let r = check(&machine, 1_000, Features::default());
    assert!(r.ok, "epoll serves the same connections");
    let f = finding(&r, "io_uring");
    assert_eq!(f.severity, Severity::Info);
    assert!(f.current.ends_with("--io auto serves on epoll"), "{f:#?}");
    assert!(f.fix.contains("SystemCallFilter=io_uring_setup"), "{f:#?}");
    machine.io_uring = None;
    let r = check(&machine, 1_000, Features::default());
    assert!(r.findings.iter().all(|f| f.name != "io_uring"));
}
