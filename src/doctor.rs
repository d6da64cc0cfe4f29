//! `herald doctor`: can this machine hold N connections?
//!
//! Two halves, kept apart so the rules can be tested with made-up machines:
//! [`Readings::read_machine`] reads rlimits, `/proc/sys` and `/proc/meminfo`; [`check`]
//! is pure rules over a [`Readings`] and returns a [`Report`] of findings (each with the
//! current value, the value N connections need, and the exact command that fixes it) and
//! an estimate of the memory N connections take. `tuning/README.md` explains every knob.

use std::fmt::Write as _;

use serde::Serialize;

use crate::compression::CompressionPolicy;
use crate::memory::{
    DEFAULT_BUFFERS_BUSY, HERALD_BYTES_HIGH, HERALD_BYTES_LOW, PerConnection, human_bytes,
};

/// Descriptors Herald needs besides its connections: listeners, epoll, wakers, stdio,
/// log files, a few per shard.
pub const FD_MARGIN: u64 = 256;

/// What the server runs with that changes a connection's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub tls: bool,
    pub compression: CompressionPolicy,
}

impl Default for Features {
    fn default() -> Self {
        Self {
            tls: false,
            compression: CompressionPolicy::Off,
        }
    }
}

/// What the rules look at. `None` means the value could not be read.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Readings {
    /// RLIMIT_NOFILE soft limit of this process (`u64::MAX` = unlimited).
    pub nofile_soft: Option<u64>,
    /// RLIMIT_NOFILE hard limit of this process.
    pub nofile_hard: Option<u64>,
    /// `fs.nr_open`: the ceiling of any process's RLIMIT_NOFILE.
    pub nr_open: Option<u64>,
    /// `fs.file-max`: open files over the whole system.
    pub file_max: Option<u64>,
    /// First field of `fs.file-nr`: files open over the whole system now.
    pub file_nr: Option<u64>,
    /// `net.core.somaxconn`.
    pub somaxconn: Option<u64>,
    /// `net.ipv4.tcp_max_syn_backlog`.
    pub tcp_max_syn_backlog: Option<u64>,
    /// `net.core.netdev_max_backlog`.
    pub netdev_max_backlog: Option<u64>,
    /// `net.ipv4.ip_local_port_range`.
    pub ip_local_port_range: Option<(u64, u64)>,
    /// Whether io_uring can be used by this process (`Err` says why not); `None` when not
    /// checked.
    pub io_uring: Option<Result<(), String>>,
    /// `net.ipv4.tcp_mem` (pages): low, pressure, high.
    pub tcp_mem: Option<[u64; 3]>,
    /// `net.ipv4.tcp_rmem` (bytes): min, default, max.
    pub tcp_rmem: Option<[u64; 3]>,
    /// `net.ipv4.tcp_wmem` (bytes): min, default, max.
    pub tcp_wmem: Option<[u64; 3]>,
    /// `net.netfilter.nf_conntrack_max`, when conntrack is loaded.
    pub nf_conntrack_max: Option<u64>,
    /// Cores this process may run on.
    pub cores: usize,
    /// `MemTotal`, bytes.
    pub mem_total: Option<u64>,
    /// `MemAvailable`, bytes.
    pub mem_available: Option<u64>,
    /// Page size, bytes (`tcp_mem` is in pages).
    pub page_size: u64,
}

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Enough for N.
    Ok,
    /// Worth knowing; does not stop N connections on this host.
    Info,
    /// Stops or slows N connections in some situations (bursts, a shell without the
    /// service's limits, conntrack in the path): fix it before going live.
    Warn,
    /// This machine cannot hold N connections until it is fixed.
    Blocker,
}

/// One checked setting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// The setting (`fs.nr_open`, `RLIMIT_NOFILE (hard)`, `memory`, ...).
    pub name: String,
    /// Its value now.
    pub current: String,
    /// The value N connections need.
    pub needed: String,
    /// The command or configuration line that fixes it; empty when nothing to do.
    pub fix: String,
    /// Why it matters.
    pub why: String,
    /// How much it matters.
    pub severity: Severity,
}

/// The memory N connections take, bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryEstimate {
    /// Herald's user-space memory, low and high.
    pub herald: (u64, u64),
    /// Kernel socket structures of idle connections, low and high.
    pub kernel_structures: (u64, u64),
    /// TLS session state (0 without TLS).
    pub tls: u64,
    /// Per-connection compressors once messages flow (0 unless per-connection).
    pub compressors: u64,
    /// Kernel socket buffers when every connection has data queued, at the
    /// `tcp_rmem`/`tcp_wmem` minimums (what the kernel still grants under pressure).
    pub kernel_buffers_busy: u64,
    /// Idle connections, low and high.
    pub idle: (u64, u64),
    /// Every connection busy, high.
    pub busy_high: u64,
    /// `MemAvailable`.
    pub available: Option<u64>,
    /// `MemTotal`.
    pub total: Option<u64>,
}

/// What `herald doctor` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The N checked for.
    pub connections: u64,
    /// Cores (the natural `--threads`).
    pub cores: usize,
    /// Every checked setting, worst first.
    pub findings: Vec<Finding>,
    /// The memory estimate.
    pub memory: MemoryEstimate,
    /// True when nothing blocks N connections.
    pub ok: bool,
}

fn show(v: Option<u64>) -> String {
    match v {
        None => "unreadable".to_owned(),
        Some(u64::MAX) => "unlimited".to_owned(),
        Some(v) => v.to_string(),
    }
}

fn triple(v: Option<[u64; 3]>) -> String {
    v.map_or_else(
        || "unreadable".to_owned(),
        |[a, b, c]| format!("{a} {b} {c}"),
    )
}

/// `v` rounded up to a multiple of 65,536 (limits people can read).
fn round_limit(v: u64) -> u64 {
    v.div_ceil(65_536).saturating_mul(65_536)
}

/// A check of `current >= needed`: `Ok` when met, `sev` when not, `Info` when unreadable.
fn at_least(
    name: &str,
    current: Option<u64>,
    needed: u64,
    sev: Severity,
    fix: String,
    why: &str,
) -> Finding {
    let severity = match current {
        None => Severity::Info,
        Some(c) if c >= needed => Severity::Ok,
        Some(_) => sev,
    };
    Finding {
        name: name.to_owned(),
        current: show(current),
        needed: format!(">= {needed}"),
        fix: if severity == Severity::Ok {
            String::new()
        } else {
            fix
        },
        why: why.to_owned(),
        severity,
    }
}

/// Backlog (accept queue, SYN queue) worth having when N clients may reconnect at once.
fn backlog_needed(n: u64) -> u64 {
    if n >= 50_000 {
        65_535
    } else if n >= 5_000 {
        4_096
    } else {
        1_024
    }
}

/// The rules: what stops `n` connections on a machine that reads like `r`.
pub fn check(r: &Readings, n: u64, features: Features) -> Report {
    let fds = n.saturating_add(FD_MARGIN);
    let fd_target = round_limit(fds);
    let mut f = Vec::new();

    f.push(at_least(
        "RLIMIT_NOFILE (hard)",
        r.nofile_hard,
        fds,
        Severity::Blocker,
        format!(
            "systemd: LimitNOFILE={fd_target} in the unit (tuning/herald.service); otherwise \
             '* hard nofile {fd_target}' in /etc/security/limits.d/herald.conf and log in again \
             (root shell: ulimit -Hn {fd_target})"
        ),
        "every connection is a file descriptor; the process cannot raise its soft limit above this",
    ));
    f.push(at_least(
        "RLIMIT_NOFILE (soft)",
        r.nofile_soft,
        fds,
        Severity::Warn,
        format!(
            "ulimit -n {fd_target} before starting herald (at most the hard limit), or \
             systemd LimitNOFILE={fd_target}"
        ),
        "accept fails with EMFILE ('Too many open files') at this many descriptors; this is \
         the shell running doctor, a systemd unit sets its own",
    ));
    f.push(at_least(
        "fs.nr_open",
        r.nr_open,
        fds,
        Severity::Blocker,
        format!("sysctl -w fs.nr_open={fd_target} (persist: tuning/sysctl.d/99-herald.conf)"),
        "no process can have RLIMIT_NOFILE above fs.nr_open, even root",
    ));
    let in_use = r.file_nr.unwrap_or(0);
    let file_target = round_limit(in_use.saturating_add(fds).saturating_mul(2));
    f.push(at_least(
        "fs.file-max",
        r.file_max.map(|m| m.saturating_sub(in_use)),
        fds,
        Severity::Blocker,
        format!("sysctl -w fs.file-max={file_target}"),
        "open files over the whole system (current = file-max minus files open now); past it \
         accept fails with ENFILE",
    ));
    let backlog = backlog_needed(n);
    f.push(at_least(
        "net.core.somaxconn",
        r.somaxconn,
        backlog,
        Severity::Warn,
        format!("sysctl -w net.core.somaxconn={backlog} (and herald --backlog {backlog})"),
        "caps each listener's accept queue; too small and a reconnect storm after a restart \
         overflows it (netstat -s: 'times the listen queue of a socket overflowed')",
    ));
    f.push(at_least(
        "net.ipv4.tcp_max_syn_backlog",
        r.tcp_max_syn_backlog,
        backlog,
        Severity::Warn,
        format!("sysctl -w net.ipv4.tcp_max_syn_backlog={backlog}"),
        "half-open connections waiting for the handshake's last ACK; too small and SYNs are \
         dropped or answered with cookies during a connect burst",
    ));
    let netdev = if n >= 50_000 { 16_384 } else { 1_000 };
    f.push(at_least(
        "net.core.netdev_max_backlog",
        r.netdev_max_backlog,
        netdev,
        Severity::Warn,
        format!("sysctl -w net.core.netdev_max_backlog={netdev}"),
        "packets queued per CPU between the NIC and the TCP stack; too small and bursts are \
         dropped (second column of /proc/net/softnet_stat grows)",
    ));

    // Ports only limit outgoing connections: the proxy in front, or the benchmark client.
    let ports = r
        .ip_local_port_range
        .map(|(lo, hi)| hi.saturating_sub(lo) + 1);
    let mut port = at_least(
        "net.ipv4.ip_local_port_range",
        ports,
        n.min(64_512),
        Severity::Info,
        format!(
            "on the proxy or benchmark host: sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\", \
             and for more than ~64k connections give it {} source addresses (or Herald as many \
             ports/addresses)",
            n.div_ceil(64_000)
        ),
        "does not limit connections Herald accepts; it limits connections one client address \
         opens to one Herald address:port (a proxy, herald-bench)",
    );
    if let Some((lo, hi)) = r.ip_local_port_range {
        port.current = format!("{lo} {hi} ({} ports)", hi.saturating_sub(lo) + 1);
    }
    f.push(port);

    // Kernel memory.
    let page = r.page_size.max(1);
    let min_bufs = match (r.tcp_rmem, r.tcp_wmem) {
        (Some(rm), Some(wm)) => Some(rm[0] + wm[0]),
        _ => None,
    };
    let per_busy = min_bufs.unwrap_or(DEFAULT_BUFFERS_BUSY);
    let busy_pages = n.saturating_mul(per_busy).div_ceil(page);
    let tcp_mem_target = r
        .tcp_mem
        .map_or([busy_pages / 2, busy_pages, busy_pages * 2], |m| {
            [
                m[0].max(busy_pages / 2),
                m[1].max(busy_pages),
                m[2].max(busy_pages.saturating_mul(2)),
            ]
        });
    let mut tcp_mem = at_least(
        "net.ipv4.tcp_mem",
        r.tcp_mem.map(|m| m[2]),
        busy_pages,
        Severity::Warn,
        format!(
            "sysctl -w net.ipv4.tcp_mem=\"{} {} {}\" (pages of {page} B)",
            tcp_mem_target[0], tcp_mem_target[1], tcp_mem_target[2]
        ),
        "pages all TCP buffers may take (low, pressure, high); a broadcast leaves data queued \
         on every socket, and at the third value the kernel stops granting buffer memory \
         ('TCP: out of memory' in dmesg, stalled sends)",
    );
    tcp_mem.current = triple(r.tcp_mem);
    tcp_mem.needed = format!(
        "high >= {busy_pages} pages ({} connections x {per_busy} B rmem+wmem min)",
        n
    );
    f.push(tcp_mem);
    let mut bufs = Finding {
        name: "net.ipv4.tcp_rmem / tcp_wmem".to_owned(),
        current: format!("{} / {}", triple(r.tcp_rmem), triple(r.tcp_wmem)),
        needed: "min 4096 each".to_owned(),
        fix: String::new(),
        why: "the min values are what every socket keeps even under memory pressure; \
              Herald's pushes are small, so large defaults only cost memory"
            .to_owned(),
        severity: Severity::Ok,
    };
    match min_bufs {
        None => bufs.severity = Severity::Info,
        Some(m) if m > 16_384 => {
            bufs.severity = Severity::Warn;
            bufs.fix = "sysctl -w net.ipv4.tcp_rmem=\"4096 16384 4194304\" \
                        net.ipv4.tcp_wmem=\"4096 16384 4194304\""
                .to_owned();
        }
        Some(_) => {}
    }
    f.push(bufs);

    if r.nf_conntrack_max.is_some() {
        let target = round_limit(fds.saturating_mul(2));
        f.push(at_least(
            "net.netfilter.nf_conntrack_max",
            r.nf_conntrack_max,
            fds,
            Severity::Warn,
            format!(
                "sysctl -w net.netfilter.nf_conntrack_max={target}, or skip tracking Herald's \
                 port: nft add rule inet raw prerouting tcp dport 8080 notrack"
            ),
            "conntrack is loaded: if it tracks Herald's traffic, a full table drops new \
             connections ('nf_conntrack: table full, dropping packet' in dmesg)",
        ));
    }

    // Memory.
    let each = PerConnection::new(features.tls, features.compression, per_busy);
    let times = |bytes: u64| n.saturating_mul(bytes);
    let memory = MemoryEstimate {
        herald: (times(each.herald.0), times(each.herald.1)),
        kernel_structures: (
            times(each.kernel_structures.0),
            times(each.kernel_structures.1),
        ),
        tls: times(each.tls),
        compressors: times(each.compressor),
        kernel_buffers_busy: times(each.buffers_busy),
        idle: (times(each.idle().0), times(each.idle().1)),
        busy_high: times(each.busy_high()),
        available: r.mem_available,
        total: r.mem_total,
    };
    let (severity, fix) = match r.mem_available {
        None => (Severity::Info, String::new()),
        Some(a) if memory.idle.1 > a => (
            Severity::Blocker,
            format!(
                "add memory, or spread the load: about {} nodes of this size",
                memory.busy_high.div_ceil(a.max(1))
            ),
        ),
        Some(a) if memory.busy_high > a => (
            Severity::Warn,
            "enough for idle connections but not for a broadcast that leaves data queued on \
             every socket: add memory or lower tcp_wmem min"
                .to_owned(),
        ),
        Some(_) => (Severity::Ok, String::new()),
    };
    f.push(Finding {
        name: "memory".to_owned(),
        current: format!(
            "MemAvailable {}",
            r.mem_available.map_or("unreadable".to_owned(), human_bytes)
        ),
        needed: format!(
            "{} - {} idle, up to {} with every socket busy",
            human_bytes(memory.idle.0),
            human_bytes(memory.idle.1),
            human_bytes(memory.busy_high)
        ),
        fix,
        why: format!(
            "Herald {HERALD_BYTES_LOW}-{HERALD_BYTES_HIGH} B per connection (measured) + 2-4 KB \
             kernel socket structures (+ 8 KB TLS session state with TLS), + tcp_rmem/tcp_wmem \
             min per socket while data is queued (+ 160 KiB per connection's own compressor \
             with --compression per-connection)"
        ),
        severity,
    });

    f.push(Finding {
        name: "cores".to_owned(),
        current: r.cores.to_string(),
        needed: String::new(),
        fix: format!(
            "herald --threads {} (one pinned shard per core; on a multi-queue NIC, match the \
             queues' IRQ cores)",
            r.cores.max(1)
        ),
        why: "one shard per core; fan-out CPU scales with cores".to_owned(),
        severity: Severity::Info,
    });

    if let Some(io_uring) = &r.io_uring {
        f.push(io_uring_finding(io_uring));
    }

    f.sort_by_key(|x| std::cmp::Reverse(x.severity));
    let ok = f.iter().all(|x| x.severity != Severity::Blocker);
    Report {
        connections: n,
        cores: r.cores,
        findings: f,
        memory,
        ok,
    }
}

fn read_str(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn read_nums(path: &str) -> Option<Vec<u64>> {
    let s = read_str(path)?;
    s.split_whitespace().map(|w| w.parse().ok()).collect()
}

fn read_num(path: &str) -> Option<u64> {
    read_nums(path)?.first().copied()
}

fn read_three(path: &str) -> Option<[u64; 3]> {
    read_nums(path)?.try_into().ok()
}

/// `MemTotal:  16334316 kB` -> bytes.
fn meminfo_field(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// Which backend `--io auto` will serve on, and what lets it use io_uring where it cannot.
fn io_uring_finding(io_uring: &Result<(), String>) -> Finding {
    let (current, fix, severity) = match io_uring {
        Ok(()) => (
            "available: --io auto serves on io_uring".to_owned(),
            String::new(),
            Severity::Ok,
        ),
        Err(why) => (
            format!("{why}: --io auto serves on epoll"),
            "allow io_uring_setup, io_uring_enter and io_uring_register (systemd: \
             SystemCallFilter=io_uring_setup io_uring_enter io_uring_register; a container: \
             a seccomp profile that permits them; sysctl -w kernel.io_uring_disabled=0), or \
             keep epoll with --io epoll"
                .to_owned(),
            Severity::Info,
        ),
    };
    Finding {
        name: "io_uring".to_owned(),
        current,
        needed: String::new(),
        fix,
        why: "io_uring costs less CPU per delivery than epoll (README, IO backends); epoll \
              serves the same connections"
            .to_owned(),
        severity,
    }
}

impl Readings {
    /// Reads this machine (and this process's limits).
    pub fn read_machine() -> Self {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one `rlimit` through a valid, exclusive pointer.
        let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
        let conv = |v: libc::rlim_t| {
            if v == libc::RLIM_INFINITY {
                u64::MAX
            } else {
                v
            }
        };
        let meminfo = read_str("/proc/meminfo").unwrap_or_default();
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Self {
            nofile_soft: got.then(|| conv(lim.rlim_cur)),
            nofile_hard: got.then(|| conv(lim.rlim_max)),
            nr_open: read_num("/proc/sys/fs/nr_open"),
            file_max: read_num("/proc/sys/fs/file-max"),
            file_nr: read_num("/proc/sys/fs/file-nr"),
            somaxconn: read_num("/proc/sys/net/core/somaxconn"),
            tcp_max_syn_backlog: read_num("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
            netdev_max_backlog: read_num("/proc/sys/net/core/netdev_max_backlog"),
            ip_local_port_range: read_nums("/proc/sys/net/ipv4/ip_local_port_range")
                .and_then(|v| Some((*v.first()?, *v.get(1)?))),
            tcp_mem: read_three("/proc/sys/net/ipv4/tcp_mem"),
            tcp_rmem: read_three("/proc/sys/net/ipv4/tcp_rmem"),
            tcp_wmem: read_three("/proc/sys/net/ipv4/tcp_wmem"),
            nf_conntrack_max: read_num("/proc/sys/net/netfilter/nf_conntrack_max"),
            io_uring: Some(crate::backend::uring::probe().map_err(|e| e.to_string())),
            cores: std::thread::available_parallelism().map_or(1, |c| c.get()),
            mem_total: meminfo_field(&meminfo, "MemTotal"),
            mem_available: meminfo_field(&meminfo, "MemAvailable"),
            page_size: if page > 0 { page as u64 } else { 4096 },
        }
    }
}

/// The report as text for a terminal.
pub fn render_text(rep: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "herald doctor: can this machine hold {} connections? {}",
        rep.connections,
        if rep.ok { "yes" } else { "NO" }
    );
    let mut shown_ok = false;
    for f in &rep.findings {
        let tag = match f.severity {
            Severity::Blocker => "BLOCKER",
            Severity::Warn => "warn",
            Severity::Info => "info",
            Severity::Ok => "ok",
        };
        if f.severity == Severity::Ok {
            if !shown_ok {
                let _ = writeln!(out, "\nenough for {} connections:", rep.connections);
                shown_ok = true;
            }
            let _ = write!(out, "  ok       {} = {}", f.name, f.current);
            let _ = if f.needed.is_empty() {
                writeln!(out)
            } else {
                writeln!(out, " ({})", f.needed)
            };
            continue;
        }
        let _ = writeln!(out, "\n{tag:<8} {} = {}", f.name, f.current);
        if !f.needed.is_empty() {
            let _ = writeln!(out, "         needed: {}", f.needed);
        }
        let _ = writeln!(out, "         why: {}", f.why);
        if !f.fix.is_empty() {
            let _ = writeln!(out, "         fix: {}", f.fix);
        }
    }
    let m = &rep.memory;
    let _ = writeln!(out, "\nmemory for {} connections:", rep.connections);
    let _ = writeln!(
        out,
        "  herald (user space, {HERALD_BYTES_LOW}-{HERALD_BYTES_HIGH} B each, measured)   {} - {}",
        human_bytes(m.herald.0),
        human_bytes(m.herald.1)
    );
    let _ = writeln!(
        out,
        "  kernel socket structures (2-4 KB each)           {} - {}",
        human_bytes(m.kernel_structures.0),
        human_bytes(m.kernel_structures.1)
    );
    if m.tls > 0 {
        let _ = writeln!(
            out,
            "  TLS session state (8 KB each)                    {}",
            human_bytes(m.tls)
        );
    }
    let _ = writeln!(
        out,
        "  idle total                                       {} - {}",
        human_bytes(m.idle.0),
        human_bytes(m.idle.1)
    );
    let _ = writeln!(
        out,
        "  + socket buffers, every socket busy (rmem+wmem min) {}  => up to {}",
        human_bytes(m.kernel_buffers_busy),
        human_bytes(m.busy_high)
    );
    if m.compressors > 0 {
        let _ = writeln!(
            out,
            "    (with each connection's own compressor, 160 KiB each: {})",
            human_bytes(m.compressors)
        );
    }
    let _ = writeln!(
        out,
        "  MemAvailable {}, MemTotal {}",
        m.available.map_or("unreadable".to_owned(), human_bytes),
        m.total.map_or("unreadable".to_owned(), human_bytes)
    );
    out
}

/// `herald doctor`: reads this machine, prints the report (text or one JSON object) and
/// returns whether the machine can hold `connections`.
pub fn run(connections: u64, features: Features, json: bool) -> anyhow::Result<bool> {
    let report = check(&Readings::read_machine(), connections, features);
    if json {
        println!("{}", simd_json::to_string(&report)?);
    } else {
        print!("{}", render_text(&report));
    }
    Ok(report.ok)
}

#[cfg(test)]
mod tests;
