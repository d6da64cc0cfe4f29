//! Composition root: binds the listeners, spawns and pins one shard thread each, wires
//! the mailboxes, and turns SIGINT/SIGTERM into a bounded graceful drain (and SIGHUP into
//! a TLS certificate reload).

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::backend::tls::TlsAcceptor;
use crate::backend::{affinity, epoll, listener, uring};
use crate::cluster::Bridge;
use crate::config::{Config, Io};
use crate::shard::{Context, Inbox, Post, Shard, Wake};

/// Runs the server until a signal asks it to stop and every shard has drained.
pub fn serve(mut config: Config) -> io::Result<()> {
    // Resolved first, so `/metrics` and the start-up lines name the backend that runs.
    config.io = backend(config.io)?;
    let io = config.io;
    let cores = affinity::placement(config.threads);
    let shards = cores.len();
    let mut ctx = Context::new(config, shards, SystemTime::now()).map_err(io::Error::other)?;
    let cluster = match &ctx.config.redis {
        Some(url) => {
            let (bridge, idle) = Bridge::new(
                url,
                ctx.config.namespaces.history_policy(),
                ctx.config.redis_ack_replicas,
                ctx.config.redis_buffer_bytes,
                ctx.config.compression.clone(),
            )
            .map_err(io::Error::other)?;
            ctx.cluster = Some(bridge);
            Some(idle)
        }
        None => None,
    };
    let ctx = Arc::new(ctx);
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
        match io {
            Io::Uring => {
                let wake = Arc::new(uring::EventFd::new()?);
                wakers.push(wake.clone());
                polls.push(Poller::Uring(wake));
            }
            Io::Epoll | Io::Auto => {
                let poll = mio::Poll::new()?;
                wakers.push(Arc::new(mio::Waker::new(poll.registry(), epoll::WAKER)?));
                polls.push(Poller::Epoll(poll));
            }
        }
    }
    let (post, receivers) = Post::new(wakers);
    let stop = Arc::new(AtomicBool::new(false));
    if let Some(idle) = cluster {
        idle.spawn(post.clone(), ctx.clone())?;
    }

    let mut threads = Vec::with_capacity(shards);
    let parts = polls.into_iter().zip(listeners).zip(receivers).zip(cores);
    for (id, (((poll, listener), receiver), core)) in parts.enumerate() {
        let shard = Shard::new(id, shards, ctx.clone(), Instant::now());
        let inbox = Inbox::new(id, receiver, post.clone());
        let (post, stop, drain, tls) = (post.clone(), stop.clone(), config.drain, tls.clone());
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
                match poll {
                    Poller::Epoll(poll) => epoll::run(epoll::Reactor {
                        shard,
                        inbox,
                        post,
                        poll,
                        listener,
                        stop,
                        drain,
                        tls,
                    }),
                    Poller::Uring(wake) => uring::run(uring::Reactor {
                        shard,
                        inbox,
                        post,
                        wake,
                        listener,
                        stop,
                        drain,
                        tls,
                    }),
                }
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
        io = ?io,
        auth = ?ctx.auth.mode(),
        tls = tls.is_some(),
        cluster = ctx.cluster.is_some(),
        "herald serving"
    );
    {
        // The line scripts and tests wait for, then the backend, which test harnesses
        // compare with the one they asked for. One write: a reader that takes the first
        // line and closes the pipe must not make the second fail. A server whose stdout
        // is gone keeps serving.
        let lines = format!("listening on {bound}\nio backend {}\n", io.name());
        let mut stdout = io::stdout().lock();
        if let Err(e) = stdout
            .write_all(lines.as_bytes())
            .and_then(|()| stdout.flush())
        {
            tracing::warn!("cannot write the start-up lines to stdout: {e}");
        }
    }

    let mut result = Ok(());
    for thread in threads {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(io::Error::other("a shard thread panicked")),
        }
    }
    if let Some(bridge) = ctx
        .cluster
        .as_ref()
        .filter(|_| config.max_connections_per_user > 0)
    {
        bridge.leave_user_count(Duration::from_secs(1));
    }
    tracing::info!("herald stopped");
    result
}

/// What a shard waits on: its epoll instance, or the eventfd its ring watches.
enum Poller {
    Epoll(mio::Poll),
    Uring(Arc<uring::EventFd>),
}

/// The backend `--io` asks for, resolved: `uring` must work here (else a clear error);
/// `auto` takes io_uring where it works, which costs less CPU per delivery than epoll in
/// every workload measured (bursts on one shard a draw) and the same memory per connection
/// at rest (README, "IO backends"); epoll elsewhere, saying why.
fn backend(io: Io) -> io::Result<Io> {
    match io {
        Io::Uring => uring::probe()
            .map(|()| Io::Uring)
            .map_err(|e| io::Error::new(e.kind(), format!("{e}; use --io epoll"))),
        Io::Epoll => Ok(Io::Epoll),
        Io::Auto => match uring::probe() {
            Ok(()) => Ok(Io::Uring),
            Err(e) => {
                tracing::warn!("{e}: --io auto serves on epoll");
                Ok(Io::Epoll)
            }
        },
    }
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
