//! What a person sees: a progress bar redrawn on a terminal (percent, bytes, MB/s over
//! the last seconds, ETA), or a JSON log line every few seconds elsewhere.

use std::io::Write;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Meter {
    name: String,
    total: u64,
    /// Bytes the server has (or is being sent, within the current request).
    done: AtomicU64,
    pub resumes: AtomicU32,
    started: Instant,
    bar: bool,
    /// Recent `(time, done)` samples for the rate.
    window: Mutex<std::collections::VecDeque<(Instant, u64)>>,
}

/// The rate is measured over this much recent time.
const WINDOW: Duration = Duration::from_secs(5);

impl Meter {
    pub fn new(name: String, total: u64, bar: bool) -> Arc<Self> {
        Arc::new(Meter {
            name,
            total,
            done: AtomicU64::new(0),
            resumes: AtomicU32::new(0),
            started: Instant::now(),
            bar,
            window: Mutex::new(Default::default()),
        })
    }

    pub fn set(&self, done: u64) {
        self.done.store(done.min(self.total), Relaxed);
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Draws (or logs) until dropped; the caller aborts the task at the end.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let every = if me.bar {
                Duration::from_millis(250)
            } else {
                Duration::from_secs(5)
            };
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                me.show();
            }
        })
    }

    /// Bytes per second over the last [`WINDOW`].
    fn rate(&self, done: u64) -> f64 {
        let now = Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        w.push_back((now, done));
        while w.len() > 2 && now.duration_since(w[0].0) > WINDOW {
            w.pop_front();
        }
        let (t0, d0) = w[0];
        let secs = now.duration_since(t0).as_secs_f64();
        if secs < 0.2 || done < d0 {
            let all = self.started.elapsed().as_secs_f64();
            return if all > 0.0 { done as f64 / all } else { 0.0 };
        }
        (done - d0) as f64 / secs
    }

    pub fn show(&self) {
        let done = self.done.load(Relaxed);
        let rate = self.rate(done);
        let pct = if self.total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / self.total as f64
        };
        let eta = (rate > 0.0).then(|| (self.total - done) as f64 / rate);
        if self.bar {
            let width = 24usize;
            let filled = ((pct / 100.0) * width as f64) as usize;
            let bar: String =
                "#".repeat(filled.min(width)) + &"-".repeat(width - filled.min(width));
            let resumes = match self.resumes.load(Relaxed) {
                0 => String::new(),
                n => format!("  {n} resumed"),
            };
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r{} [{bar}] {pct:5.1}%  {} / {}  {:6.1} MB/s  ETA {}{resumes}\x1b[K",
                self.name,
                human(done),
                human(self.total),
                rate / 1e6,
                eta.map_or("--:--".into(), clock),
            );
            let _ = err.flush();
        } else {
            tracing::info!(
                file = %self.name,
                bytes = done,
                total = self.total,
                percent = format!("{pct:.1}"),
                mb_per_s = format!("{:.1}", rate / 1e6),
                eta_s = eta.map(|e| e.round() as u64),
                resumes = self.resumes.load(Relaxed),
                "upload progress"
            );
        }
    }

    /// Something a person should read (a drop, a resume): on its own line above the
    /// bar, or a log line.
    pub fn note(&self, message: &str, detail: &str) {
        if self.bar {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "\r\x1b[K{message}: {detail}");
            drop(err);
            self.show();
        } else {
            tracing::warn!(error = %detail, "{message}");
        }
    }

    /// Ends the bar's line.
    pub fn close(&self) {
        if self.bar {
            self.show();
            eprintln!();
        }
    }
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `1:02:03` or `2:03`.
fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    match s / 3600 {
        0 => format!("{}:{:02}", s / 60, s % 60),
        h => format!("{h}:{:02}:{:02}", s / 60 % 60, s % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_clocks() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(clock(125.0), "2:05");
        assert_eq!(clock(3723.0), "1:02:03");
    }
}
