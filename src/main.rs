//! The `herald` command: parse the command line, set up logging, run.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald::config::{Config, ServeArgs};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Herald: a WebSocket push server (pub/sub fan-out) for bare metal.
#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Without a subcommand, `herald` serves (same options as `herald serve`).
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve WebSocket pub/sub on one port (default 127.0.0.1:8080, in-memory hub).
    /// Logging: HERALD_LOG=info|debug|... (tracing filter syntax).
    Serve(Box<ServeArgs>),
    /// Interactive client (ws:// or wss://): prints what arrives, sends what you type (JSON,
    /// or /sub CHANNEL [SINCE], /unsub CHANNEL, /pub CHANNEL [=SEQ] JSON, /ping, /quit).
    Client {
        /// e.g. ws://127.0.0.1:8080/ws
        url: String,
        /// Token sent as `Authorization: Bearer`.
        #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// PEM file of the CA certificates a wss:// server's certificate must chain to
        /// [default: the system's, /etc/ssl/certs/ca-certificates.crt].
        #[arg(long)]
        ca: Option<std::path::PathBuf>,
    },
    /// Checks this machine's open-file limits, sysctls, cores and memory for N connections
    /// and prints what would stop them, with the command that fixes each (tuning/README.md).
    /// Exits 1 when the machine cannot hold N.
    Doctor {
        /// Connections to check for.
        #[arg(long, default_value_t = 100_000)]
        connections: u64,
        /// The server will run with TLS: count each connection's session state (~8 KB).
        #[arg(long)]
        tls: bool,
        /// The server's --compression: per-connection counts each connection's own
        /// compressor (~160 KiB) once messages flow.
        #[arg(long, value_enum, default_value = "off")]
        compression: herald::compression::CompressionPolicy,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// A panic anywhere ends the process, in every profile. Release builds abort already
/// (`panic = "abort"`, Cargo.toml); a debug build, which the integration tests run, would
/// otherwise unwind only the panicking shard thread while the others keep answering, and a
/// half-dead server could pass a test. The default hook still prints the message first.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}

fn main() -> ExitCode {
    abort_on_panic();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let args = match cli.command {
        Some(Command::Serve(args)) => *args,
        Some(Command::Client { url, token, ca }) => {
            return match herald::client::run(&url, token.as_deref(), ca.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("herald client: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Doctor {
            connections,
            tls,
            compression,
            json,
        }) => {
            let features = herald::doctor::Features { tls, compression };
            return match herald::doctor::run(connections, features, json) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("herald doctor: {e}");
                    ExitCode::from(2)
                }
            };
        }
        None => cli.serve,
    };
    let config = match Config::load(args.options, args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("herald: {e}");
            return ExitCode::from(2);
        }
    };
    match herald::serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e}");
            ExitCode::FAILURE
        }
    }
}
