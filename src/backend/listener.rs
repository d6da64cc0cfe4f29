//! One `SO_REUSEPORT` listener per shard, all on the same address; the kernel spreads
//! incoming connections over them by a hash of the connection's addresses.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// How long a fixed port in use is waited for before that is an error.
const PORT_RELEASE_WAIT: Duration = Duration::from_secs(1);

fn bind_one(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Binds `count` listeners to `addr`. With port 0 the first picks the port and the rest
/// join it. Unless `shared` says other processes may serve the same port, a fixed port is
/// first probed without `SO_REUSEPORT`, so a second server (or a forgotten one) on the
/// same port is an error rather than a silent share of the traffic.
pub fn bind_all(
    addr: SocketAddr,
    count: usize,
    backlog: u32,
    shared: bool,
) -> io::Result<Vec<TcpListener>> {
    if addr.port() != 0 && !shared {
        drop(bind_when_free(addr).map_err(|e| with_addr(e, addr))?);
    }
    let first = bind_one(addr, backlog, true).map_err(|e| with_addr(e, addr))?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(bind_one(bound, backlog, true).map_err(|e| with_addr(e, bound))?);
    }
    Ok(listeners)
}

/// Binds `addr` alone, waiting up to [`PORT_RELEASE_WAIT`] while it is in use: the listener
/// of a server that was just killed can outlive it briefly (an io_uring server's ring holds
/// it and is torn down after the exit, ~0.1 s), and a restart must not fail on it. A port
/// another live process holds is still an error, that much later.
fn bind_when_free(addr: SocketAddr) -> io::Result<TcpListener> {
    let deadline = Instant::now() + PORT_RELEASE_WAIT;
    let mut said = false;
    loop {
        match bind_one(addr, 1, false) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                if !said {
                    tracing::info!(
                        "{addr} is in use; waiting up to {PORT_RELEASE_WAIT:?} for it to be released"
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

fn with_addr(e: io::Error, addr: SocketAddr) -> io::Error {
    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_gives_every_listener_the_same_port() {
        let listeners = bind_all("127.0.0.1:0".parse().unwrap(), 3, 16, false).unwrap();
        let port = listeners[0].local_addr().unwrap().port();
        assert!(
            listeners
                .iter()
                .all(|l| l.local_addr().unwrap().port() == port)
        );
    }

    #[test]
    fn a_taken_port_is_an_error() {
        let listeners = bind_all("127.0.0.1:0".parse().unwrap(), 1, 16, false).unwrap();
        let taken = listeners[0].local_addr().unwrap();
        let err = bind_all(taken, 1, 16, false).unwrap_err();
        assert!(err.to_string().contains("cannot listen on"), "{err}");
        // Processes that all say the port is shared may serve it together.
        let first = bind_all(taken, 1, 16, true);
        assert!(first.is_ok());
    }
}
