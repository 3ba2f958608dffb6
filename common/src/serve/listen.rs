//! Accepting connections from clients nobody vouches for (the upload proxy, the upload
//! server, the metrics endpoint). A silent or half-open client must not hold a task and
//! a file descriptor for ever, and running out of descriptors must not turn the accept
//! loop into a busy loop: a connection limit, a TLS handshake timeout, a header timeout
//! (set on hyper's builder, [`header_timeout`]) and back-off on accept errors.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long clients nobody vouches for may take, set once by the binary from its
/// command line (`--handshake-timeout`, `--header-timeout`, `--body-idle-timeout`, or
/// their `FERRYDISK_*` environment variables, read by clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The TLS handshake (10 s).
    pub handshake: Duration,
    /// A request's headers (hyper's `header_read_timeout`, also between requests on a
    /// kept-alive connection): 30 s.
    pub header: Duration,
    /// An upload's body without a byte, before the upload is failed as stalled (a
    /// client gone without a FIN, a link that stopped): 300 s. CDI has none (its
    /// proxy's request timeout is 24 h), so one stalled client holds its upload server.
    pub body_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            header: Duration::from_secs(30),
            body_idle: Duration::from_secs(300),
        }
    }
}

/// The timeouts on the command line of every serving binary, env vars read by clap.
#[derive(clap::Args, Debug, Clone)]
pub struct TimeoutArgs {
    /// Seconds a client may take to complete the TLS handshake.
    #[arg(long = "handshake-timeout", env = "FERRYDISK_HANDSHAKE_TIMEOUT", value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake: u64,
    /// Seconds a client may take to send a request's headers.
    #[arg(long = "header-timeout", env = "FERRYDISK_HEADER_TIMEOUT", value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub header: u64,
    /// Seconds an upload's body may go without a byte before it is failed as stalled.
    #[arg(long = "body-idle-timeout", env = "FERRYDISK_BODY_IDLE_TIMEOUT", value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_idle: u64,
}

impl TimeoutArgs {
    /// Sets them for the process.
    pub fn apply(&self) {
        set_timeouts(Timeouts {
            handshake: Duration::from_secs(self.handshake),
            header: Duration::from_secs(self.header),
            body_idle: Duration::from_secs(self.body_idle),
        });
    }
}

static TIMEOUTS: std::sync::OnceLock<Timeouts> = std::sync::OnceLock::new();

/// Sets the process's timeouts (once, before serving; later calls are ignored).
pub fn set_timeouts(t: Timeouts) {
    let _ = TIMEOUTS.set(t);
}

fn timeouts() -> Timeouts {
    TIMEOUTS.get().copied().unwrap_or_default()
}

/// How long a client may take to complete the TLS handshake.
pub fn handshake_timeout() -> Duration {
    timeouts().handshake
}

/// How long a client may take to send a request's headers.
pub fn header_timeout() -> Duration {
    timeouts().header
}

/// How long an upload's body may go without a byte.
pub fn body_idle_timeout() -> Duration {
    timeouts().body_idle
}

/// A body that sent nothing for the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing for {} s (stalled)", .0.as_secs())]
pub struct Stalled(pub Duration);

/// The next frame of a client's body, or [`Stalled`] when none comes within `idle`.
pub async fn next_frame<B>(
    body: &mut B,
    idle: Duration,
) -> Result<Option<Result<hyper::body::Frame<B::Data>, B::Error>>, Stalled>
where
    B: hyper::body::Body + Unpin,
{
    use http_body_util::BodyExt;
    tokio::time::timeout(idle, body.frame())
        .await
        .map_err(|_| Stalled(idle))
}

/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 512;
/// The longest pause after accept errors (EMFILE, ENFILE, ENOBUFS), as Go's net/http.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A listener that holds a permit per open connection and backs off on accept errors.
pub struct GuardedListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    backoff: Duration,
}

impl GuardedListener {
    pub fn new(listener: TcpListener, max_connections: usize) -> Self {
        GuardedListener {
            listener,
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
            backoff: Duration::ZERO,
        }
    }

    /// The next connection and its permit (drop the permit when the connection ends).
    /// At the connection limit this waits for one to end; after an accept error it
    /// sleeps, doubling from 5 ms to 1 s, instead of spinning.
    pub async fn accept(&mut self) -> (TcpStream, OwnedSemaphorePermit) {
        let permit = match self.permits.clone().acquire_owned().await {
            Ok(p) => p,
            // The semaphore is never closed; if it were, wait for ever rather than spin.
            Err(_) => std::future::pending().await,
        };
        loop {
            match self.listener.accept().await {
                Ok((tcp, _)) => {
                    self.backoff = Duration::ZERO;
                    return (tcp, permit);
                }
                Err(e) => {
                    self.backoff = next_backoff(self.backoff);
                    tracing::warn!(error = %e, backoff_ms = self.backoff.as_millis() as u64, "accept failed; backing off");
                    tokio::time::sleep(self.backoff).await;
                }
            }
        }
    }
}

fn next_backoff(prev: Duration) -> Duration {
    if prev.is_zero() {
        Duration::from_millis(5)
    } else {
        (prev * 2).min(MAX_BACKOFF)
    }
}

/// A TLS handshake (or any connection set-up) bounded by [`handshake_timeout`].
pub async fn with_handshake_timeout<T, E: std::fmt::Display>(
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    let limit = handshake_timeout();
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no TLS handshake within {} s", limit.as_secs())),
    }
}

/// Raises the soft open-files limit to the hard one (Go's runtime does the same at
/// start): a server's connection limit should be what bounds it, not a default of 1024.
pub fn raise_nofile_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            tracing::debug!(error = %e, "could not raise the open-files limit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Duration::ZERO;
        let mut seen = vec![];
        for _ in 0..12 {
            b = next_backoff(b);
            seen.push(b);
        }
        assert_eq!(seen[0], Duration::from_millis(5));
        assert_eq!(seen[1], Duration::from_millis(10));
        assert_eq!(*seen.last().expect("last"), MAX_BACKOFF);
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_for_a_permit() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut g = GuardedListener::new(l, 1);
        let _c1 = TcpStream::connect(addr).await.expect("c1");
        let _c2 = TcpStream::connect(addr).await.expect("c2");
        let (s1, p1) = g.accept().await;
        let second = tokio::time::timeout(Duration::from_millis(200), g.accept()).await;
        assert!(
            second.is_err(),
            "a second connection must wait for the first"
        );
        drop((s1, p1));
        let second = tokio::time::timeout(Duration::from_secs(2), g.accept()).await;
        assert!(second.is_ok());
    }
}
