//! One accepted connection: a bounded TLS handshake, then HTTP/1.1 with a header read
//! timeout, optionally watched for a graceful shutdown. Written once for the upload
//! server, the progress metric and the upload proxy.

use super::listen::{header_timeout, with_handshake_timeout};
use crate::readahead::ReadAhead;
use hyper::body::{Body, Incoming};
use hyper::service::HttpService;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::Watcher;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A served connection's transport: TLS over a socket read ahead in 64 KiB gulps (an
/// upload body arrives in a few large reads, not one read per TLS record; an idle
/// connection holds no buffer).
pub type Transport = TlsStream<ReadAhead<TcpStream>>;

/// The read-ahead of a served connection: smaller than a client's, as a server holds
/// many at once.
const SERVER_READ_AHEAD: usize = 64 << 10;

/// Serves `tcp` on a task of its own; `make` builds the service once the handshake is
/// done (it may read the peer's certificates). The permit is held until the connection
/// ends, so the listener's connection bound covers handshakes and bodies alike.
pub fn spawn<F, S, B>(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    permit: OwnedSemaphorePermit,
    watcher: Option<Watcher>,
    make: F,
) where
    F: FnOnce(&Transport) -> S + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    tokio::spawn(async move {
        let _permit = permit;
        let tls = match with_handshake_timeout(acceptor.accept(ReadAhead::with_capacity(
            SERVER_READ_AHEAD,
            true,
            tcp,
        )))
        .await
        {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                return;
            }
        };
        let svc = make(&tls);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout())
            .serve_connection(TokioIo::new(tls), svc);
        let _ = match watcher {
            Some(w) => w.watch(conn).await,
            None => conn.await,
        };
    });
}
