//! The progress metric over HTTPS with a fresh self-signed certificate, as CDI serves
//! it (docs/cdi-contract.md section 1.10): every path answers with the exposition.

use ferrydisk_common::progress::{metric_text, Progress, METRIC};
use ferrydisk_common::serve::{conn, listen, tls};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

pub async fn bind(addr: SocketAddr) -> anyhow::Result<(TcpListener, tokio_rustls::TlsAcceptor)> {
    let ck = rcgen::generate_simple_self_signed(vec![
        "cloner_target".to_string(),
        "localhost".to_string(),
    ])?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let config = tls::server_config_der(vec![ck.cert.der().clone()], key, Default::default())?;
    let listener = TcpListener::bind(addr).await?;
    Ok((listener, tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

pub async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    owner_uid: String,
    progress: Arc<Progress>,
) {
    serve_named(
        listener,
        acceptor,
        owner_uid,
        progress,
        (METRIC, "The import progress in percentage"),
    )
    .await
}

/// [`serve`] with another of CDI's progress counters (the cloner's).
pub async fn serve_named(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    owner_uid: String,
    progress: Arc<Progress>,
    (metric, help): (&'static str, &'static str),
) {
    let owner_uid: Arc<str> = owner_uid.into();
    // A scraper needs a connection or two; anything more is not a scraper.
    let mut listener = listen::GuardedListener::new(listener, 16);
    loop {
        let (tcp, permit) = listener.accept().await;
        let progress = progress.clone();
        let owner_uid = owner_uid.clone();
        conn::spawn(acceptor.clone(), tcp, permit, None, move |_| {
            service_fn(move |_req| {
                let body = metric_text(metric, help, &owner_uid, progress.percent());
                async move {
                    hyper::Response::builder()
                        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                        .body(Full::new(Bytes::from(body)))
                }
            })
        });
    }
}
