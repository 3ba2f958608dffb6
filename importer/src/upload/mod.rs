//! `importer upload-server`: CDI's cdi-uploadserver (docs/cdi-contract.md section 4), streaming.
//! The body goes through the same pipeline as an import while it arrives, so a sync
//! upload answers as soon as the last byte is durable.

mod clone;
mod handler;

use crate::cli::UploadArgs;
use crate::destination::Destination;
use crate::disk::{DiskPlan, DiskRequest, Parsing};
use crate::failure::Failure;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::progress::{metric_text, Progress};
use ferrydisk_common::serve::listen::{GuardedListener, MAX_CONNECTIONS};
use ferrydisk_common::serve::tls;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// What the server is doing; CDI's status codes follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Busy,
    Done,
}

pub struct Server {
    pub args: UploadArgs,
    pub phase: std::sync::Mutex<Phase>,
    /// Set once, with the message to write, when the upload is complete.
    pub finished: tokio::sync::watch::Sender<Option<Result<TerminationMessage, String>>>,
    /// The progress of the current (or last) upload, which `/metrics` reports.
    pub progress: std::sync::Mutex<Arc<Progress>>,
}

/// The upload server's progress counter: the shape of the importer's (CDI's controller
/// scrapes none for uploads, so the name says what it counts).
pub const UPLOAD_METRIC: &str = "kubevirt_cdi_upload_progress_total";

impl Server {
    /// CDI's upload server is lenient: a value that does not parse means the default.
    pub fn disk_plan(&self, archive: bool) -> Result<DiskPlan, Failure> {
        let a = &self.args;
        DiskPlan::new(
            DiskRequest {
                volume: &a.volume,
                dest: a.dest.as_deref(),
                archive,
                preallocation: Some(&a.preallocation),
                image_size: &a.image_size,
                checksum: None,
            },
            Parsing::Lenient,
        )
    }

    /// A new upload's counters replace the last one's.
    pub fn set_progress(&self, p: Arc<Progress>) {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// The exposition `/metrics` answers: percent of the declared length (or of the
    /// virtual size when the length is not declared), 100 only once the disk is synced.
    pub fn metrics_text(&self) -> String {
        let p = self
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        metric_text(
            UPLOAD_METRIC,
            "The upload progress in percentage",
            &self.args.owner_uid,
            p.percent(),
        )
    }

    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_phase(&self, p: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// Idle -> Busy atomically; otherwise the phase that refused it.
    pub fn try_start(&self) -> Result<(), Phase> {
        let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        match *p {
            Phase::Idle => {
                *p = Phase::Busy;
                Ok(())
            }
            other => Err(other),
        }
    }
}

/// Runs the server until an upload completes (exit 0 with "Upload Complete"), the
/// deadline passes while idle (exit 0 with `deadlinePassed`) or it fails to serve (1).
pub async fn run(args: UploadArgs) -> i32 {
    let deadline = match args.deadline.as_deref().filter(|d| !d.is_empty()) {
        None => None,
        Some(d) => match humantime::parse_rfc3339_weak(d) {
            Ok(t) => Some(t),
            Err(e) => {
                // CDI: klog.Fatal -> exit 255.
                tracing::error!(deadline = d, error = %e, "invalid DEADLINE");
                return 255;
            }
        },
    };
    let client_ca = (!args.no_client_auth).then_some(args.client_ca.as_path());
    let config = match tls::server_config(
        &args.tls_cert,
        &args.tls_key,
        tls::ServerTls {
            client_ca,
            min_version: &args.tls_min_version,
            http11_only: false,
        },
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "invalid TLS config");
            return 1;
        }
    };
    let port: u16 = args.listen_port.parse().unwrap_or(8443);
    let addr: SocketAddr = match format!(
        "{}:{port}",
        if args.listen_address.is_empty() {
            "0.0.0.0"
        } else {
            &args.listen_address
        }
    )
    .parse()
    {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "invalid listen address");
            return 1;
        }
    };
    ferrydisk_common::serve::listen::raise_nofile_limit();
    let mut listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => GuardedListener::new(l, MAX_CONNECTIONS),
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen");
            return 1;
        }
    };
    let disk_dest = Destination::choose(
        args.dest.as_deref(),
        &args.volume.block_device,
        &args.volume.data_dir,
        false,
    );
    let (finished, mut done_rx) = tokio::sync::watch::channel(None);
    let server = Arc::new(Server {
        phase: std::sync::Mutex::new(Phase::Idle),
        finished,
        progress: Default::default(),
        args,
    });
    tracing::info!(%addr, dest = %disk_dest.path().display(), client_auth = !server.args.no_client_auth, "upload server listening");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let deadline_hit = deadline_watch(server.clone(), deadline);
    tokio::pin!(deadline_hit);
    let outcome: Result<TerminationMessage, String> = loop {
        tokio::select! {
            (tcp, permit) = listener.accept() => {
                handler::spawn_connection(server.clone(), acceptor.clone(), tcp, permit, graceful.watcher());
            }
            _ = done_rx.changed() => {
                if let Some(result) = done_rx.borrow().clone() {
                    break result;
                }
            }
            msg = &mut deadline_hit => break Ok(msg),
        }
    };
    drop(listener);
    // Let the answer to the last request reach the client before exiting.
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    let log = server.args.volume.termination_log.clone();
    let outcome = match (outcome, server.args.push_dest.clone()) {
        (Ok(msg), Some(dest)) if msg.deadline_passed.is_none() => {
            push_upload(&dest, disk_dest.path(), &msg)
                .await
                .map(|()| msg)
        }
        (o, _) => o,
    };
    match outcome {
        Ok(msg) => match msg.write(&log) {
            Ok(json) => {
                tracing::info!(termination_message = %json, "done");
                0
            }
            Err(e) => {
                tracing::error!(error = %e, "could not write the termination message");
                1
            }
        },
        Err(e) => {
            // An async upload failed after its 200: CDI exits 1, no termination message.
            tracing::error!(error = %e, "upload processing failed");
            1
        }
    }
}

/// Resolves when the deadline passes while no upload is running.
async fn deadline_watch(server: Arc<Server>, deadline: Option<SystemTime>) -> TerminationMessage {
    let Some(deadline) = deadline else {
        return std::future::pending().await;
    };
    if let Ok(wait) = deadline.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    loop {
        match server.phase() {
            Phase::Idle => {
                tracing::info!("deadline passed with no upload running");
                return TerminationMessage {
                    deadline_passed: Some(true),
                    message: Some("Deadline Passed".into()),
                    ..Default::default()
                };
            }
            // An upload in flight finishes first (CDI polls every 2 s).
            _ => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
}

/// `--push-dest`: the uploaded disk into a registry, its labels describing what was
/// uploaded (format, sizes) rather than what the volume now holds.
async fn push_upload(
    dest: &str,
    disk: &std::path::Path,
    msg: &TerminationMessage,
) -> Result<(), String> {
    use clap::Parser;
    #[derive(Parser)]
    struct PushCli {
        #[command(flatten)]
        push: crate::cli::PushArgs,
    }
    let argv = [
        "importer".to_string(),
        format!("--source={}", disk.display()),
        format!("--dest={dest}"),
        // The volume as it was written (a qcow2 volume stays qcow2).
        "--convert=keep".to_string(),
    ];
    let args = PushCli::try_parse_from(argv)
        .map_err(|e| format!("push settings: {}", e.to_string().trim()))?
        .push;
    let origin = msg
        .import_info
        .as_ref()
        .map(crate::push::spool::Origin::from);
    tracing::info!(%dest, disk = %disk.display(), "pushing the uploaded disk");
    let summary = crate::push::push_with(&args, origin)
        .await
        .map_err(|e| format!("push failed: {e}"))?;
    tracing::info!(summary = %serde_json::to_string(&summary).unwrap_or_default(), "pushed the uploaded disk");
    Ok(())
}
