//! `importer`: CDI's cdi-importer, streaming. Exit codes and the termination message are
//! decided in [`finish`] and nowhere else.

mod blank;
mod cli;
mod cloner;
mod config;
mod destination;
mod disk;
mod failure;
mod import;
mod inspect;
mod metrics;
mod net;
mod poller;
mod push;
mod report;
mod serve_disk;
mod size_detection;
mod sources;
mod transfer;
mod upload;
mod uploader;

use clap::Parser;
use cli::{Cli, Command};
use ferrydisk_common::cdi::termination;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::serve::process;
use ferrydisk_common::ErrorKind;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How the process is set up for a role: log level, where a panic's message goes,
/// runtime workers.
struct Profile {
    verbosity: u8,
    termination_log: Option<PathBuf>,
    workers: usize,
}

impl Command {
    /// The serving timeouts the role takes, if it serves.
    fn timeouts(&self) -> Option<&ferrydisk_common::serve::listen::TimeoutArgs> {
        match self {
            Command::Import(a) => Some(&a.volume.timeouts),
            Command::UploadServer(a) => Some(&a.volume.timeouts),
            Command::CloneSource(a) => Some(&a.timeouts),
            Command::ClonerStartup(a) => Some(&a.timeouts),
            _ => None,
        }
    }

    fn profile(&self) -> Profile {
        let p = |verbosity, termination_log: Option<&Path>, workers| Profile {
            verbosity,
            termination_log: termination_log.map(Path::to_path_buf),
            workers,
        };
        // Decoding and writing run on blocking threads; the workers only move bytes
        // between sockets and channels. An import, and an upload server, have one data
        // connection at a time (hyper polls the upload handler inside the connection's
        // task), and one worker for it measured better than two: a second worker mostly
        // woke up to find nothing to steal (a task that used up its cooperative budget
        // yields and wakes a parked worker through an eventfd: 9.5% of an upload
        // server's samples), and every wake-up is CPU a pod's quota charges.
        // * Registry import under 0.75 CPU, four batches of 8 alternating runs: CPU
        //   medians 0.58-0.62 -> 0.56-0.60 s, wall medians 0.88-0.95 -> 0.81-0.87 s.
        // * 4 GiB raw uploaded straight to the server, four alternating runs: 3.11-3.40
        //   -> 2.58-3.15 s, server CPU 2.84-3.10 -> 2.47-2.85 s; through the proxy
        //   4.03-4.12 -> 3.81-4.08 s.
        // Clone sources, serve-disk and a push (an upload and an import side by side,
        // and the client's connection task) keep two.
        match self {
            Command::Import(a) => p(a.volume.verbosity, Some(&a.volume.termination_log), 1),
            Command::UploadServer(a) => p(a.volume.verbosity, Some(&a.volume.termination_log), 1),
            Command::Inspect(a) => p(a.import.volume.verbosity, None, 1),
            Command::SourceUpdatePoller(_) => p(0, None, 1),
            Command::ServeDisk(_) => p(0, None, 2),
            Command::SizeDetection(a) => p(0, Some(&a.termination_log), 2),
            Command::CloneSource(a) => p(a.verbosity, Some(&a.termination_log), 2),
            Command::ClonerStartup(_) => p(3, Some(Path::new("/dev/termination-log")), 2),
            Command::Push(a) => p(a.verbosity, None, 2),
            Command::Upload(a) => p(a.verbosity, None, 2),
        }
    }
}

fn main() {
    let args = cli::with_default_subcommand(ferrydisk_common::cdi::klog::strip_output_flags(
        std::env::args_os().collect(),
    ));
    let cli = Cli::parse_from(args);
    let profile = cli.command.profile();
    if let Some(t) = cli.command.timeouts() {
        t.apply();
    }
    process::keep_freed_memory();
    process::init_logging(profile.verbosity);
    termination::install_panic_hook(profile.termination_log, "Unable to process data: ");
    // One TLS implementation for every client and server in the binary (oci-client's
    // reqwest takes the process default instead of bringing a second crypto library).
    ferrydisk_common::serve::tls::install_default_provider();
    let runtime = process::runtime(Some(profile.workers));
    let code = match cli.command {
        Command::Import(args) => runtime.block_on(run(*args)),
        Command::UploadServer(args) => runtime.block_on(upload::run(*args)),
        Command::ServeDisk(args) => runtime.block_on(serve_disk::run(args)),
        Command::SizeDetection(args) => size_detection::run(args),
        Command::CloneSource(args) => runtime.block_on(cloner::run(args)),
        Command::ClonerStartup(args) => runtime.block_on(cloner::startup(args)),
        Command::SourceUpdatePoller(args) => runtime.block_on(poller::run(args)),
        Command::Push(args) => runtime.block_on(push::run(*args)),
        Command::Inspect(args) => runtime.block_on(inspect::run(*args)),
        Command::Upload(args) => runtime.block_on(uploader::run(*args)),
    };
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    std::process::exit(code);
}

async fn run(args: cli::ImportArgs) -> i32 {
    if args.internal_panic_test {
        let v: Vec<u64> = Vec::new();
        // Deliberately out of bounds, on a worker thread like a converter bug would be.
        let _ = tokio::task::spawn_blocking(move || v[usize::from(v.is_empty())]).await;
    }
    let progress = Arc::new(Progress::default());
    let termination_log = args.volume.termination_log.clone();
    if let Some(addr) = args.metrics_addr() {
        match metrics::bind(addr).await {
            Ok((listener, acceptor)) => {
                tracing::info!(%addr, "serving progress metric over HTTPS");
                tokio::spawn(metrics::serve(
                    listener,
                    acceptor,
                    args.owner_uid.clone(),
                    progress.clone(),
                ));
            }
            Err(e) => tracing::warn!(%addr, error = %e, "progress metric not served"),
        }
    }
    let reporter = report::spawn(progress.clone(), std::io::stderr().is_terminal());
    let result = match config::ImportConfig::from_args(args) {
        Ok(config) => import::run(config, progress.clone()).await,
        Err(f) => Err(f),
    };
    reporter.abort();
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    finish(result, &progress, &termination_log)
}

fn finish(
    result: Result<Option<termination::TerminationMessage>, failure::Failure>,
    progress: &Progress,
    log: &Path,
) -> i32 {
    match result {
        Ok(Some(msg)) => {
            progress.complete();
            match msg.write(log) {
                Ok(json) => {
                    tracing::info!(termination_message = %json, "done");
                    0
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not write the termination message");
                    1
                }
            }
        }
        Ok(None) => {
            progress.complete();
            0
        }
        Err(f) => {
            let message = f.message();
            let kind = f.kind();
            tracing::error!(class = kind.class(), kind = %kind, error = %message, "import failed");
            let code = f.exit_code();
            let written = match kind {
                // The controller mounts scratch and starts a new pod.
                ErrorKind::ScratchRequired => termination::TerminationMessage {
                    scratch_space_required: Some(true),
                    preallocation_applied: Some(false),
                    message: Some(termination::IMPORT_COMPLETE.into()),
                    ..Default::default()
                }
                .write(log)
                .map(|_| ()),
                // Checksum mismatch: JSON so the controller reads it and stops retrying.
                _ if code == 0 => termination::TerminationMessage {
                    message: Some(message),
                    ..Default::default()
                }
                .write(log)
                .map(|_| ()),
                _ => termination::write_failure(log, &message).map(|_| ()),
            };
            if let Err(e) = written {
                tracing::error!(error = %e, "could not write the termination message");
            }
            code
        }
    }
}
