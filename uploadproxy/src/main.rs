//! `uploadproxy`: CDI's cdi-uploadproxy (docs/cdi-contract.md section 5). Checks the upload token,
//! waits for the PVC's upload server, and streams the body to it over mTLS.

mod app;
mod kube;
mod proxy;
mod ready;
mod token;
mod upstream;

use anyhow::Context;
use axum::routing::any;
use clap::Parser;
use ferrydisk_common::serve::{conn, listen, process, tls};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "uploadproxy",
    version,
    about = "Streams `curl -T` uploads to per-PVC upload servers (CDI upload proxy compatible)"
)]
struct Args {
    /// Log verbosity, klog style (`-v=<n>`).
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    verbosity: u8,
    /// How long clients may take (the handshake, the headers, a stalled body).
    #[command(flatten)]
    timeouts: listen::TimeoutArgs,
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    #[arg(
        long = "server-cert",
        env = "SERVER_CERT_FILE",
        default_value = "/var/run/certs/cdi-uploadproxy-server-cert/tls.crt"
    )]
    server_cert: PathBuf,
    #[arg(
        long = "server-key",
        env = "SERVER_KEY_FILE",
        default_value = "/var/run/certs/cdi-uploadproxy-server-cert/tls.key"
    )]
    server_key: PathBuf,
    /// Client certificate presented to upload servers (re-read when it changes).
    #[arg(
        long = "client-cert",
        env = "UPLOAD_CLIENT_CERT_FILE",
        default_value = "/var/run/certs/cdi-uploadserver-client-cert/tls.crt"
    )]
    client_cert: PathBuf,
    #[arg(
        long = "client-key",
        env = "UPLOAD_CLIENT_KEY_FILE",
        default_value = "/var/run/certs/cdi-uploadserver-client-cert/tls.key"
    )]
    client_key: PathBuf,
    /// CA bundle that signs upload server certificates [default: ConfigMap
    /// UPLOAD_SERVER_CA_BUNDLE_CONFIG_MAP, key ca-bundle.crt, read through the API].
    #[arg(long = "upload-server-ca", env = "UPLOAD_SERVER_CA_FILE")]
    upload_server_ca: Option<PathBuf>,
    #[arg(
        long = "upload-server-ca-configmap",
        env = "UPLOAD_SERVER_CA_BUNDLE_CONFIG_MAP",
        default_value = "cdi-uploadserver-signer-bundle"
    )]
    upload_server_ca_configmap: String,
    /// The cdi-apiserver's public key (PEM) that signs upload tokens.
    #[arg(
        long = "public-key",
        env = "APISERVER_PUBLIC_KEY",
        hide_env_values = true
    )]
    public_key: Option<String>,
    /// The same, from a file.
    #[arg(long = "public-key-file")]
    public_key_file: Option<PathBuf>,
    /// Upload server URL; `{service}` (cdi-upload-<pvc>, as a Service name), `{pvc}`, `{namespace}`.
    #[arg(
        long = "upstream-template",
        default_value = "https://{service}.{namespace}.svc:8443"
    )]
    upstream_template: String,
    /// Route by template alone and take readiness from the upload server's /healthz.
    #[arg(long = "no-kubernetes")]
    no_kubernetes: bool,
    /// Kubernetes API URL [default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT].
    #[arg(long = "kube-api")]
    kube_api: Option<String>,
    /// The API server's address inside a pod (set by the kubelet).
    #[arg(
        long = "kube-service-host",
        env = "KUBERNETES_SERVICE_HOST",
        hide = true
    )]
    kube_service_host: Option<String>,
    #[arg(
        long = "kube-service-port",
        env = "KUBERNETES_SERVICE_PORT",
        default_value = "443",
        hide = true
    )]
    kube_service_port: String,
    #[arg(
        long = "kube-token-file",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    kube_token_file: PathBuf,
    #[arg(
        long = "kube-ca-file",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    kube_ca_file: PathBuf,
    /// CDI's namespace (where the CA ConfigMap lives) [default: the service account's].
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// How long an upload waits for its upload server (CDI: 10 s).
    /// How often the upload server CA bundle is re-read (CDI renews its signer).
    #[arg(
        long = "ca-refresh",
        env = "FERRYDISK_CA_REFRESH",
        value_name = "SECONDS",
        default_value_t = 60
    )]
    ca_refresh: u64,
    #[arg(long = "ready-timeout", value_name = "SECONDS", default_value_t = 10)]
    ready_timeout: u64,
    /// How long running uploads may take to finish after SIGTERM.
    #[arg(
        long = "shutdown-timeout",
        value_name = "SECONDS",
        default_value_t = 3600
    )]
    shutdown_timeout: u64,
}

fn main() {
    let args = Args::parse_from(ferrydisk_common::cdi::klog::strip_output_flags(
        std::env::args_os().collect(),
    ));
    process::keep_freed_memory();
    process::init_logging(args.verbosity);
    args.timeouts.apply();
    // No termination-log flag here: the container's default path, if writable.
    ferrydisk_common::cdi::termination::install_panic_hook(
        Some("/dev/termination-log".into()),
        "uploadproxy: ",
    );
    tls::install_default_provider();
    let rt = process::runtime(None);
    if let Err(e) = rt.block_on(run(args)) {
        tracing::error!(error = %format!("{e:#}"), "uploadproxy failed");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let key_pem = match (&args.public_key, &args.public_key_file) {
        (_, Some(f)) => std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
        (Some(k), None) => k.clone().into_bytes(),
        (None, None) => anyhow::bail!("APISERVER_PUBLIC_KEY (or --public-key-file) is required"),
    };
    let verifier = token::Verifier::new(&key_pem)
        .context("APISERVER_PUBLIC_KEY must be a PEM RSA public key")?;
    let kube = if args.no_kubernetes {
        None
    } else {
        let base = match &args.kube_api {
            Some(u) => u.clone(),
            None => {
                let host = args
                    .kube_service_host
                    .as_deref()
                    .filter(|h| !h.is_empty())
                    .context("not in a cluster: pass --kube-api or --no-kubernetes")?;
                format!("https://{host}:{}", args.kube_service_port)
            }
        };
        Some(kube::Kube::new(
            &base,
            &args.kube_token_file,
            &args.kube_ca_file,
        )?)
    };
    let upstream_ca = match (&args.upload_server_ca, &kube) {
        (Some(f), _) => app::CaSource::File(f.clone()),
        (None, Some(_)) => {
            let ns = args
                .namespace
                .clone()
                .or_else(|| {
                    std::fs::read_to_string(
                        "/var/run/secrets/kubernetes.io/serviceaccount/namespace",
                    )
                    .ok()
                })
                .unwrap_or_else(|| "cdi".into());
            app::CaSource::ConfigMap {
                namespace: ns.trim().to_string(),
                name: args.upload_server_ca_configmap.clone(),
            }
        }
        (None, None) => anyhow::bail!("--upload-server-ca is required with --no-kubernetes"),
    };
    let app = Arc::new(app::App::new(
        app::Config {
            upstream_template: args.upstream_template.clone(),
            ready_timeout: Duration::from_secs(args.ready_timeout),
            client_cert: args.client_cert.clone(),
            client_key: args.client_key.clone(),
            upstream_ca,
        },
        verifier,
        kube,
    ));
    app.set_ca(app.read_ca().await?);
    tokio::spawn(
        app.clone()
            .refresh_ca(Duration::from_secs(args.ca_refresh.max(1))),
    );
    let mut router = axum::Router::new()
        .route("/healthz", any(|| async { "OK" }))
        .route("/upload/{token}", any(proxy::with_path_token));
    // CDI's upload paths, all proxied whatever the method (the server enforces it).
    for p in ferrydisk_common::cdi::upload::client_paths() {
        router = router.route(&p, any(proxy::with_header));
    }
    // Resumable uploads (tus): the creation URL and each upload under it.
    let resumable = ferrydisk_common::cdi::upload::RESUMABLE;
    router = router
        .route(resumable, any(proxy::resumable))
        .route(&format!("{resumable}/{{id}}"), any(proxy::resumable));
    // CDI wraps the proxy in an allow-all CORS handler (browser uploads); a browser's
    // tus client (Uppy, tus-js-client) also reads the tus headers of the answers.
    let router = router
        .layer(
            tower_http::cors::CorsLayer::very_permissive()
                .expose_headers(proxy::TUS_HEADERS.map(axum::http::HeaderName::from_static)),
        )
        .layer(axum::middleware::from_fn(proxy::access_log))
        .with_state(app);
    serve(&args, router).await
}

/// TLS accept loop; on SIGTERM/SIGINT stops accepting and lets running uploads finish.
async fn serve(args: &Args, router: axum::Router) -> anyhow::Result<()> {
    // HTTP/1.1 only: an upload is one long body, HTTP/2 flow control only slows it, and
    // curl (7.88) reports an early refusal on HTTP/2 as a framing error instead of the
    // status we send.
    // Renewed certificates are picked up from the mounted secret without a restart.
    let config = tls::server_config_reloading(
        &args.server_cert,
        &args.server_key,
        tls::ServerTls {
            http11_only: true,
            ..Default::default()
        },
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    listen::raise_nofile_limit();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let mut listener = listen::GuardedListener::new(listener, listen::MAX_CONNECTIONS);
    tracing::info!(addr = %args.listen, "upload proxy listening");
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            (tcp, permit) = listener.accept() => {
                let router = router.clone();
                conn::spawn(acceptor.clone(), tcp, permit, Some(graceful.watcher()), move |_| {
                    hyper_util::service::TowerToHyperService::new(router)
                });
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("shutting down: no new connections, waiting for running uploads");
    drop(listener);
    let _ = tokio::time::timeout(
        Duration::from_secs(args.shutdown_timeout),
        graceful.shutdown(),
    )
    .await;
    Ok(())
}
