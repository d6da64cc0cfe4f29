//! Composition root: binds the listeners, spawns and pins one shard thread each, wires
//! the mailboxes, and turns SIGINT/SIGTERM into a bounded graceful drain (and SIGHUP into
//! a TLS certificate reload).

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::backend::tls::TlsAcceptor;
use crate::backend::{affinity, epoll, listener};
use crate::config::Config;
use crate::shard::{Context, Inbox, Post, Shard, Wake};

/// Runs the server until a signal asks it to stop and every shard has drained.
pub fn serve(config: Config) -> io::Result<()> {
    let cores = affinity::placement(config.threads);
    let shards = cores.len();
    let ctx = Arc::new(Context::new(config, shards).map_err(io::Error::other)?);
    let config = &ctx.config;
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(
            TlsAcceptor::load(files).map_err(io::Error::other)?,
        )),
        None => None,
    };
    let listeners = listener::bind_all(config.listen, shards, config.backlog, config.shared_port)?;
    let bound = listeners[0].local_addr()?;

    let mut polls = Vec::with_capacity(shards);
    let mut wakers: Vec<Arc<dyn Wake>> = Vec::with_capacity(shards);
    for _ in 0..shards {
        let poll = mio::Poll::new()?;
        wakers.push(Arc::new(mio::Waker::new(poll.registry(), epoll::WAKER)?));
        polls.push(poll);
    }
    let (post, receivers) = Post::new(wakers);
    let stop = Arc::new(AtomicBool::new(false));

    let mut threads = Vec::with_capacity(shards);
    let parts = polls.into_iter().zip(listeners).zip(receivers).zip(cores);
    for (id, (((poll, listener), receiver), core)) in parts.enumerate() {
        let reactor = epoll::Reactor {
            shard: Shard::new(id, shards, ctx.clone()),
            inbox: Inbox::new(id, receiver, post.clone()),
            post: post.clone(),
            poll,
            listener,
            stop: stop.clone(),
            drain: config.drain,
            tls: tls.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("herald-shard-{id}"))
            .spawn(move || {
                if let Some(core) = core
                    && !core_affinity::set_for_current(core)
                {
                    tracing::warn!(
                        shard = id,
                        core = core.id,
                        "could not pin shard to its core"
                    );
                }
                epoll::run(reactor)
            })?;
        threads.push(thread);
    }

    spawn_signal_thread(stop, post)?;
    if let Some(acceptor) = tls.clone() {
        spawn_reload_thread(acceptor)?;
    }
    tracing::info!(
        %bound,
        shards,
        epoch = %ctx.epoch,
        io = "epoll",
        auth = ?ctx.auth.mode(),
        tls = tls.is_some(),
        "herald serving"
    );
    {
        // The one line scripts and tests wait for.
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "listening on {bound}")?;
        stdout.flush()?;
    }

    let mut result = Ok(());
    for thread in threads {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(io::Error::other("a shard thread panicked")),
        }
    }
    tracing::info!("herald stopped");
    result
}

/// First SIGINT/SIGTERM: drain. A second one: exit at once.
fn spawn_signal_thread(stop: Arc<AtomicBool>, post: Arc<Post>) -> io::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("herald-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if stop.swap(true, Ordering::AcqRel) {
                    tracing::warn!(signal, "second signal: exiting without draining");
                    std::process::exit(1);
                }
                tracing::info!(signal, "draining: closing every client with 1001");
                post.wake_all();
            }
        })?;
    Ok(())
}

/// SIGHUP: new TLS handshakes use the certificate files as they are now; connections
/// already open keep theirs. A file that does not load is logged and changes nothing.
fn spawn_reload_thread(acceptor: Arc<TlsAcceptor>) -> io::Result<()> {
    let mut signals = Signals::new([SIGHUP])?;
    std::thread::Builder::new()
        .name("herald-tls-reload".into())
        .spawn(move || {
            for _ in signals.forever() {
                match acceptor.reload() {
                    Ok(()) => tracing::info!("tls: certificate reloaded"),
                    Err(e) => {
                        tracing::error!("tls: reload failed, keeping the old certificate: {e}")
                    }
                }
            }
        })?;
    Ok(())
}
