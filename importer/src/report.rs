//! Progress for people: a JSON log line every few seconds when not on a TTY (bytes,
//! percent and throughput of each stage), a one-line progress bar on a TTY.

use ferrydisk_common::progress::{Progress, Snapshot};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

const LOG_EVERY: Duration = Duration::from_secs(5);

pub fn spawn(progress: Arc<Progress>, tty: bool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut last = (Instant::now(), Snapshot::default());
        let mut tick = tokio::time::interval(if tty {
            Duration::from_millis(500)
        } else {
            LOG_EVERY
        });
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = Instant::now();
            let s = progress.snapshot();
            let pct = progress.percent();
            let dt = now.duration_since(last.0).as_secs_f64().max(1e-3);
            let rate = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / dt / 1e6;
            let (net, dec, wr) = (
                rate(s.source, last.1.source),
                rate(s.decoded, last.1.decoded),
                rate(s.written, last.1.written),
            );
            if tty {
                let filled = (pct / 5.0) as usize;
                eprint!(
                    "\r[{}{}] {pct:6.2}%  net {net:7.1} MB/s  decode {dec:7.1} MB/s  write {wr:7.1} MB/s  {:>6.1} GiB ",
                    "#".repeat(filled.min(20)),
                    " ".repeat(20 - filled.min(20)),
                    s.decoded as f64 / (1u64 << 30) as f64
                );
                let _ = std::io::stderr().flush();
            } else {
                tracing::info!(
                    percent = pct,
                    source_bytes = s.source,
                    source_total = ?s.source_total,
                    decoded_bytes = s.decoded,
                    written_bytes = s.written,
                    network_mb_s = (net * 10.0).round() / 10.0,
                    decode_mb_s = (dec * 10.0).round() / 10.0,
                    write_mb_s = (wr * 10.0).round() / 10.0,
                    elapsed_s = start.elapsed().as_secs(),
                    "progress"
                );
            }
            last = (now, s);
        }
    })
}
