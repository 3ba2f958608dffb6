//! Process setup every binary shares: logging and the tokio runtime.

use std::io::IsTerminal;

/// klog-style verbosity (`-v=<n>`: 0-2 info, 3+ debug; `RUST_LOG` overrides), to
/// stderr: compact text on a terminal, one JSON object per line otherwise.
pub fn init_logging(verbosity: u8) {
    use tracing_subscriber::EnvFilter;
    let level = if verbosity >= 3 { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.compact().init();
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init();
    }
}

/// The multi-threaded runtime; `workers: None` is one per core. On failure the process
/// cannot do anything, so it says why and exits 1.
pub fn runtime(workers: Option<usize>) -> tokio::runtime::Runtime {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    match b.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("starting runtime: {e}");
            std::process::exit(1);
        }
    }
}
