//! The node-pull disk server, CDI's `cdi-containerimage-server` (docs/cdi-contract.md
//! section 3). CDI's controller copies it into the user's containerDisk container and
//! starts it there: it serves the one file in `/disk` on loopback with `Range` support,
//! writes the ready file (the disk's name) once it listens, serves the container's
//! environment (the image's ENV) at `/info` for labels, and exits when the importer
//! creates the done file.
//!
//! Its own small binary: it runs inside arbitrary images, so it carries only hyper and
//! file reads (`args.rs` parses CDI's Go-style flags by hand, `disk.rs` finds the disk,
//! `http.rs` answers). The importer's `serve-disk` subcommand runs the same code.

pub mod args;
pub mod disk;
pub mod http;

pub use args::{Options, UsageError};

use std::sync::Arc;
use std::time::Duration;

/// Connections served at once (the importer opens one, and one more to resume).
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// One line on stderr, klog-like (`I` info, `E` error), as the rest of the pod logs.
pub fn log(level: char, message: &str) {
    eprintln!("{level} serve-disk: {message}");
}

/// Serves until the done file appears; the exit code.
pub async fn run(opts: Options) -> i32 {
    let (listener, served) = match start(&opts).await {
        Ok(s) => s,
        Err(e) => {
            log('E', &e.to_string());
            return 1;
        }
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            accepted = accept(&listener, &permits) => {
                let Some((tcp, permit)) = accepted else { continue };
                let served = served.clone();
                let svc = hyper::service::service_fn(move |req| http::serve(served.clone(), req));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = watcher.watch(conn).await;
                });
            }
            _ = tick.tick() => {
                if opts.done_file.exists() {
                    let _ = std::fs::remove_file(&opts.done_file);
                    break;
                }
            }
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    let _ = std::fs::remove_file(&opts.ready_file);
    log('I', "Importer has completed");
    0
}

/// Why the server does not serve.
#[derive(Debug)]
pub enum StartError {
    Bootc(&'static str),
    Disk(disk::DiskError),
    Listen {
        port: u16,
        source: std::io::Error,
    },
    Ready {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Bootc(d) => write!(
                f,
                "bootc image detected: /{d} exists; bootable container images are not VM disks"
            ),
            StartError::Disk(e) => write!(f, "cannot serve the disk: {e}"),
            StartError::Listen { port, source } => {
                write!(f, "cannot listen on 127.0.0.1:{port}: {source}")
            }
            StartError::Ready { path, source } => {
                write!(
                    f,
                    "cannot write the ready file {}: {source}",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for StartError {}

/// The checks CDI's server makes, the listener, then the ready file (the disk's name)
/// once it listens.
async fn start(opts: &Options) -> Result<(tokio::net::TcpListener, Arc<http::Served>), StartError> {
    if let Some(d) = disk::bootc(&opts.root) {
        return Err(StartError::Bootc(d));
    }
    let disk = disk::find(&opts.image_dir).map_err(StartError::Disk)?;
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", opts.port))
        .await
        .map_err(|source| StartError::Listen {
            port: opts.port,
            source,
        })?;
    write_ready(&opts.ready_file, &name).map_err(|source| StartError::Ready {
        path: opts.ready_file.clone(),
        source,
    })?;
    log(
        'I',
        &format!("serving {} on 127.0.0.1:{}", disk.display(), opts.port),
    );
    let served = Arc::new(http::Served {
        path: disk,
        name,
        env: std::env::vars_os()
            .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
            .collect(),
    });
    Ok((listener, served))
}

/// The next connection and its permit; `None` after an accept error (a pause first,
/// so a full file table does not spin).
async fn accept(
    listener: &tokio::net::TcpListener,
    permits: &Arc<tokio::sync::Semaphore>,
) -> Option<(tokio::net::TcpStream, tokio::sync::OwnedSemaphorePermit)> {
    let permit = permits.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((tcp, _)) => Some((tcp, permit)),
        Err(e) => {
            log('E', &format!("accept: {e}"));
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

fn write_ready(path: &std::path::Path, name: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(name.as_bytes())
}
