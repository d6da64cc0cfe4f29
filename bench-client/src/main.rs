//! `herald-bench`: the benchmark client of Herald. It measures what a user feels — fan-out
//! latency from the scheduled publish time to each subscriber, at very large connection
//! counts — and what it costs the server, so machines can be sized with it.

mod capacity;
mod connect;
mod echo;
mod fanout;
mod floor;
mod load;
mod message;
mod plan;
mod publisher;
mod refusal;
mod report;
mod server;
mod source;
mod stats;
mod sweep;
mod tls;
mod worker;

use clap::Parser;

/// Benchmark client for Herald (and any WebSocket pub/sub server).
///
/// Latency is measured without coordinated omission: every message carries the time it was
/// scheduled to be sent (CLOCK_MONOTONIC, shared by all processes on the machine) and each
/// receiver records receive time minus scheduled time, so a server or publisher that falls
/// behind shows up in the figures. Run the server and the benchmark on different cores
/// (taskset) and check the client's own CPU per delivery before trusting a figure.
#[derive(Debug, Parser)]
#[command(name = "herald-bench", version, about, long_about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Subcommand,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Subcommand {
    /// Fan-out latency: N subscribers over C channels, one paced publisher; reports
    /// p50..p99.99/max latency, deliveries/s, lost/duplicated/out-of-order deliveries,
    /// connect rate, and with --server-pid the server's CPU per delivery and RSS per
    /// connection.
    Fanout(fanout::FanoutArgs),
    /// Opens idle (optionally subscribed) connections and holds them: how many a server
    /// holds, how fast it accepts them, and (with --server-pid) at what memory.
    Connect(connect::ConnectArgs),
    /// Round-trip latency and throughput on the /echo endpoint, paced (--rate) or
    /// closed-loop.
    Echo(echo::EchoArgs),
    /// Runs `fanout` over a grid of connections x rate x size and prints a capacity table
    /// (with server RSS per connection, each line's knee) and the largest point that meets
    /// --slo-p99 with nothing lost; --report adds the capacity chart, --json is what `plan`
    /// reads. On a loopback server the connections spread over source addresses by
    /// themselves; --server-cmd starts a fresh server for each point.
    Sweep(sweep::SweepArgs),
    /// From a sweep's measured points (--from sweep.json), the cores and memory one machine
    /// needs for N connections at a rate and size under a p99 objective, or the number of
    /// machines of a given kind, with the arithmetic shown and the margin it leaves.
    Plan(plan::PlanArgs),
    /// A minimal reference server: on each publish it writes one pre-encoded frame to every
    /// subscribed socket with one plain write(2) each. `fanout` against it measures what
    /// fan-out costs in the kernel on this machine: the floor Herald is compared to.
    Floor(floor::FloorArgs),
    /// Internal: a worker process spawned by the coordinator (JSON lines on stdin/stdout).
    #[command(hide = true)]
    Worker,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Subcommand::Fanout(args) => fanout::run(&args),
        Subcommand::Connect(args) => connect::run(&args),
        Subcommand::Echo(args) => echo::run(&args),
        Subcommand::Sweep(args) => sweep::run(&args),
        Subcommand::Floor(args) => floor::run(&args),
        Subcommand::Plan(args) => plan::run(&args),
        Subcommand::Worker => worker::run_worker(),
    }
}
