//! The transport for large HTTPS bodies (a layer blob, a disk behind a URL): HTTP/1.1
//! over rustls over a socket read ahead in 256 KiB gulps ([`ReadAhead`]). reqwest's
//! own connector hands rustls the socket directly, and rustls reads one TLS record
//! (16 KiB) per `recvfrom`; reqwest offers no hook below its TLS. This client takes
//! the same rustls configuration (roots, CA files, the insecure switch), the same
//! resolver (hickory, with our `.localhost` names) and the same connect timeout and
//! keepalive, so a request behaves as through reqwest, in a tenth of the syscalls.
//!
//! Used by `net::follow` for GET and HEAD to `https://` URLs when no proxy is set;
//! everything else (plain HTTP, proxies, request bodies) goes through reqwest.

use ferrydisk_common::readahead::ReadAhead;
use futures_util::future::BoxFuture;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a `.localhost` name resolves (RFC 6761 6.3), for both transports.
pub const LOOPBACK: [SocketAddr; 2] = [
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0),
];

/// The HTTPS client; cheap to clone (a pool of connections behind an `Arc`).
#[derive(Clone)]
pub struct Direct {
    client: hyper_util::client::legacy::Client<Connector, reqwest::Body>,
    user_agent: reqwest::header::HeaderValue,
}

impl Direct {
    pub fn new(
        user_agent: &'static str,
        tls: rustls::ClientConfig,
        localhost_names: &[String],
        connect_timeout: Duration,
        keepalive: Duration,
    ) -> Direct {
        let mut http = HttpConnector::new_with_resolver(Resolver {
            localhost: Arc::new(localhost_names.to_vec()),
        });
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(keepalive));
        http.set_nodelay(true);
        let connector = Connector {
            http,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        };
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector);
        Direct {
            client,
            user_agent: reqwest::header::HeaderValue::from_static(user_agent),
        }
    }

    /// Sends `req` (an `https://` request) and returns the answer as a reqwest
    /// response, so callers read it the way they read every other.
    pub async fn send(&self, req: reqwest::Request) -> Result<reqwest::Response, DirectError> {
        use reqwest::header::{HeaderValue, ACCEPT, USER_AGENT};
        let mut req: http::Request<reqwest::Body> =
            req.try_into().map_err(|e: reqwest::Error| DirectError {
                connect: false,
                source: Box::new(e),
            })?;
        // What reqwest's client adds to every request.
        let h = req.headers_mut();
        if !h.contains_key(USER_AGENT) {
            h.insert(USER_AGENT, self.user_agent.clone());
        }
        if !h.contains_key(ACCEPT) {
            h.insert(ACCEPT, HeaderValue::from_static("*/*"));
        }
        let resp = self.client.request(req).await.map_err(|e| DirectError {
            connect: e.is_connect(),
            source: Box::new(e),
        })?;
        Ok(reqwest::Response::from(resp.map(reqwest::Body::wrap)))
    }
}

/// A request that failed before its answer's headers arrived.
#[derive(Debug, thiserror::Error)]
#[error("{}", ferrydisk_common::error::chain_line(&**.source))]
pub struct DirectError {
    /// The connection itself failed (TCP or the TLS handshake).
    pub connect: bool,
    #[source]
    pub source: BoxError,
}

/// What a failed request failed on, and its kind, in the words `net::describe` uses for
/// reqwest's errors: a TLS cause named, else the chain on one line.
pub fn describe(e: &DirectError) -> (ferrydisk_common::ErrorKind, String) {
    if let Some(tls) = ferrydisk_common::tls_failure::diagnose(e) {
        return (tls.kind, tls.message());
    }
    (ferrydisk_common::ErrorKind::Network, e.to_string())
}

/// Names resolved as reqwest's hickory resolver does (both families, the system's
/// resolv.conf), `.localhost` names to the loopback addresses.
#[derive(Clone)]
struct Resolver {
    localhost: Arc<Vec<String>>,
}

fn hickory() -> Result<&'static hickory_resolver::TokioResolver, BoxError> {
    static RESOLVER: OnceLock<hickory_resolver::TokioResolver> = OnceLock::new();
    if let Some(r) = RESOLVER.get() {
        return Ok(r);
    }
    let mut builder = hickory_resolver::TokioResolver::builder_tokio()
        .map_err(|e| format!("reading the system's DNS configuration: {e}"))?;
    builder.options_mut().ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    Ok(RESOLVER.get_or_init(|| builder.build()))
}

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let localhost = self.localhost.clone();
        Box::pin(async move {
            let host = name.as_str();
            if host.ends_with(".localhost") && localhost.iter().any(|n| n == host) {
                return Ok(LOOPBACK.to_vec().into_iter());
            }
            let found = hickory()?.lookup_ip(host).await?;
            Ok(found
                .into_iter()
                .map(|ip| SocketAddr::new(ip, 0))
                .collect::<Vec<_>>()
                .into_iter())
        })
    }
}

#[derive(Clone)]
struct Connector {
    http: HttpConnector<Resolver>,
    tls: tokio_rustls::TlsConnector,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Conn, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let mut http = self.http.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            if uri.scheme_str() != Some("https") {
                return Err(format!("not an https URL: {uri}").into());
            }
            let host = uri
                .host()
                .ok_or("a URL with no host")?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let name = rustls::pki_types::ServerName::try_from(host)?;
            let tcp = http.call(uri).await?.into_inner();
            let stream = tls.connect(name, ReadAhead::new(tcp)).await?;
            Ok(Conn(TokioIo::new(stream)))
        })
    }
}

type Stream = tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>;

/// One connection: what hyper reads and writes, and tells the pool about.
struct Conn(TokioIo<Stream>);

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
