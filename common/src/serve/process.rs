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

/// Keeps freed heap memory for reuse instead of returning it to the kernel at once.
///
/// The network side allocates a fresh buffer of up to ~400 KiB for nearly every read
/// (hyper hands the filled part of its read buffer on as the body chunk and reserves a
/// new one), and the chunk is freed on another thread a moment later; the writer's
/// 1 MiB blocks come and go with each import. With glibc's defaults such buffers are
/// mmap'ed and munmap'ed, or trimmed off the heap, so every read page-faults its buffer
/// in again: 12-20% of an upload server's samples (`perf record`), charged to the pod.
/// Served from the heap and kept there, the same pages are reused. One arena: with one
/// per thread, each kept its own copy of those buffers, and RSS crept up by 5 MiB over
/// a few hundred uploads (the soak test's slope went from ~0.3 to 4-5 KiB per upload);
/// with one it is flat (upload server 20.5 MiB from the 100th to the 1000th upload).
/// The buffers are large and few, so the arena's lock costs nothing measurable.
/// Measured: a registry import under 0.75 CPU, 0.83 -> 0.71 CPU-s (medians of 8
/// alternating runs); a 4 GiB direct upload, server system time 2.3-2.7 s -> 1.7-1.8 s;
/// proxied, the proxy's 2.4 s -> 1.3-1.7 s and its peak RSS 18.6 -> 15 MiB.
pub fn keep_freed_memory() {
    // glibc's mallopt(3) parameters (malloc.h).
    const M_TRIM_THRESHOLD: libc::c_int = -1;
    const M_MMAP_THRESHOLD: libc::c_int = -3;
    const M_ARENA_MAX: libc::c_int = -8;
    // SAFETY: mallopt only sets allocator parameters; it is called at startup, before
    // any other thread exists, with values glibc documents as valid.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(M_TRIM_THRESHOLD, 32 << 20);
        libc::mallopt(M_ARENA_MAX, 1);
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
