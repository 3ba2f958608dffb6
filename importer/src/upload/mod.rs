//! `importer upload-server`: CDI's cdi-uploadserver (docs/cdi-contract.md section 4), streaming.
//! The body goes through the same pipeline as an import while it arrives, so a sync
//! upload answers as soon as the last byte is durable.

mod admit;
mod clone;
mod handler;
mod outcome;
mod pump;
mod resumable;

use crate::cli::UploadArgs;
use crate::config::UploadServerConfig;
use crate::disk::DiskPlan;
use crate::failure::Failure;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::progress::{metric_text, Progress};
use ferrydisk_common::serve::listen::{GuardedListener, MAX_CONNECTIONS};
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
    pub config: UploadServerConfig,
    pub phase: std::sync::Mutex<Phase>,
    /// Set once, with the message to write, when the upload is complete.
    pub finished: tokio::sync::watch::Sender<Option<Result<TerminationMessage, UploadFailed>>>,
    /// The progress of the current (or last) upload, which `/metrics` reports.
    pub progress: std::sync::Mutex<Arc<Progress>>,
    /// The resumable upload, if one was created (`/v1beta1/upload-resumable`).
    pub resumable: resumable::Registry,
}

/// Why an upload that was accepted did not complete (an async upload after its 200,
/// or the push after it): logged, exit 1, as CDI.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UploadFailed {
    #[error("{}", .0.detail())]
    Processing(Failure),
    #[error("push failed: {0}")]
    Push(Arc<crate::push::error::PushFailure>),
}

/// The upload server's progress counter: the shape of the importer's (CDI's controller
/// scrapes none for uploads, so the name says what it counts).
pub const UPLOAD_METRIC: &str = "kubevirt_cdi_upload_progress_total";

impl Server {
    /// A new upload's plan: a disk image, or an archive unpacked into the volume.
    pub fn disk_plan(&self, archive: bool) -> DiskPlan {
        match archive {
            false => self.config.disk.for_volume(),
            true => self.config.archive.for_volume(),
        }
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
            &self.config.owner_uid,
            p.percent(),
        )
    }

    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_phase(&self, p: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// Idle -> Busy atomically, held by the returned guard (back to Idle when it drops,
    /// Done through [`Busy::complete`]); otherwise the phase that refused it.
    pub fn try_start(self: &Arc<Self>) -> Result<Busy, Phase> {
        let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        match *p {
            Phase::Idle => {
                *p = Phase::Busy;
                Ok(Busy {
                    server: self.clone(),
                    completed: false,
                })
            }
            other => Err(other),
        }
    }
}

/// The server is busy with one upload while this lives: dropped, the server takes a
/// new upload (a refused or failed one); completed, it takes no more.
pub struct Busy {
    server: Arc<Server>,
    completed: bool,
}

impl Busy {
    pub fn complete(mut self) {
        self.completed = true;
        self.server.set_phase(Phase::Done);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if !self.completed {
            self.server.set_phase(Phase::Idle);
        }
    }
}

/// Runs the server until an upload completes (exit 0 with "Upload Complete"), the
/// deadline passes while idle (exit 0 with `deadlinePassed`) or it fails to serve (1).
pub async fn run(args: UploadArgs) -> i32 {
    let config = match UploadServerConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the upload server cannot start");
            return e.exit_code();
        }
    };
    ferrydisk_common::serve::listen::raise_nofile_limit();
    let addr = config.addr;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => GuardedListener::new(l, MAX_CONNECTIONS),
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen");
            return 1;
        }
    };
    tracing::info!(%addr, dest = %config.disk.dest.path().display(), client_auth = config.client_name.is_some(), "upload server listening");
    let server = Arc::new(Server {
        phase: std::sync::Mutex::new(Phase::Idle),
        finished: tokio::sync::watch::channel(None).0,
        progress: Default::default(),
        resumable: Default::default(),
        config,
    });
    resumable::restore(&server).await;
    let outcome = serve(server.clone(), listener).await;
    let outcome = match (outcome, &server.config.push) {
        (Ok(msg), Some(push)) if msg.deadline_passed.is_none() => push_upload(push, &msg)
            .await
            .map(|()| msg)
            .map_err(|e| UploadFailed::Push(Arc::new(e))),
        (o, _) => o,
    };
    match outcome {
        Ok(msg) => match msg.write(&server.config.termination_log) {
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

/// Takes connections until an upload is finished or the deadline passes idle, then
/// lets the answer to the last request reach its client.
async fn serve(
    server: Arc<Server>,
    mut listener: GuardedListener,
) -> Result<TerminationMessage, UploadFailed> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server.config.tls.clone()));
    let mut done_rx = server.finished.subscribe();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let deadline_hit = deadline_watch(server.clone(), server.config.deadline);
    tokio::pin!(deadline_hit);
    let outcome = loop {
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
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    outcome
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
            // An upload in flight finishes first (CDI polls every 2 s); a resumable one
            // that nobody is sending to is put away, and the server ends.
            _ => {
                resumable::abandon_if_idle(&server).await;
                tokio::time::sleep(Duration::from_secs(2)).await
            }
        }
    }
}

/// `--push-dest`: the uploaded disk into a registry, its labels describing what was
/// uploaded (format, sizes) rather than what the volume now holds.
async fn push_upload(
    push: &crate::config::PushConfig,
    msg: &TerminationMessage,
) -> Result<(), crate::push::error::PushFailure> {
    let origin = msg
        .import_info
        .as_ref()
        .map(crate::push::spool::Origin::from);
    tracing::info!(dest = %push.dest_shown, disk = %push.source.display(), "pushing the uploaded disk");
    let summary = crate::push::push(push, origin).await?;
    tracing::info!(summary = %serde_json::to_string(&summary).unwrap_or_default(), "pushed the uploaded disk");
    Ok(())
}
