//! Byte counters for each stage (source, decode, write), turned into CDI's progress
//! percentage and its Prometheus exposition.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// CDI's metric name; the controller scrapes it with a regex, so it must match exactly.
pub const METRIC: &str = "kubevirt_cdi_import_progress_total";

#[derive(Debug)]
pub struct Progress {
    source: AtomicU64,
    decoded: AtomicU64,
    written: AtomicU64,
    source_total: AtomicU64,
    virtual_total: AtomicU64,
    /// Highest percentage reported so far, as f64 bits (positive floats order like
    /// their bits), so the counter only ever goes up as Prometheus counters must.
    reported: AtomicU64,
    /// When the transfer began (the counters' creation).
    started: Instant,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            source: AtomicU64::new(0),
            decoded: AtomicU64::new(0),
            written: AtomicU64::new(0),
            source_total: AtomicU64::new(0),
            virtual_total: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            started: Instant::now(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub source: u64,
    pub decoded: u64,
    pub written: u64,
    pub source_total: Option<u64>,
    pub virtual_total: Option<u64>,
}

impl Progress {
    pub fn add_source(&self, n: u64) {
        self.source.fetch_add(n, Relaxed);
    }
    pub fn add_decoded(&self, n: u64) {
        self.decoded.fetch_add(n, Relaxed);
    }
    pub fn add_written(&self, n: u64) {
        self.written.fetch_add(n, Relaxed);
    }
    /// The size of the source stream (HTTP Content-Length), if known.
    pub fn set_source_total(&self, n: Option<u64>) {
        self.source_total.store(n.unwrap_or(0), Relaxed);
    }
    /// The image's virtual size, once known (tar entry size, raw length).
    pub fn set_virtual_total(&self, n: Option<u64>) {
        self.virtual_total.store(n.unwrap_or(0), Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let opt = |v: u64| (v > 0).then_some(v);
        Snapshot {
            source: self.source.load(Relaxed),
            decoded: self.decoded.load(Relaxed),
            written: self.written.load(Relaxed),
            source_total: opt(self.source_total.load(Relaxed)),
            virtual_total: opt(self.virtual_total.load(Relaxed)),
        }
    }

    /// Percent done, monotonic, two decimals, at most 99.99 until [`Progress::complete`]
    /// (the last flush and fsync still lie ahead when the last byte arrives).
    pub fn percent(&self) -> f64 {
        let s = self.snapshot();
        let raw = match (s.source_total, s.virtual_total) {
            (Some(t), _) => s.source as f64 / t as f64,
            (None, Some(v)) => s.written as f64 / v as f64,
            (None, None) => 0.0,
        };
        let pct = ((raw * 100.0).clamp(0.0, 99.99) * 100.0).floor() / 100.0;
        let prev = self.reported.fetch_max(pct.to_bits(), Relaxed);
        f64::from_bits(prev).max(pct)
    }

    /// The import starts again from byte 0 (the source changed under a resume): the
    /// stage counters start over; the reported percentage never goes down.
    pub fn restart(&self) {
        self.source.store(0, Relaxed);
        self.decoded.store(0, Relaxed);
        self.written.store(0, Relaxed);
    }

    /// Time since the counters were created (the start of the import or upload).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn complete(&self) {
        self.reported.fetch_max(100f64.to_bits(), Relaxed);
    }
}

/// The exposition the CDI controller scrapes: one counter, one label, `ownerUID`.
pub fn prometheus_text(owner_uid: &str, percent: f64) -> String {
    metric_text(
        METRIC,
        "The import progress in percentage",
        owner_uid,
        percent,
    )
}

/// [`prometheus_text`] for another of CDI's progress counters (the cloner's).
pub fn metric_text(metric: &str, help: &str, owner_uid: &str, percent: f64) -> String {
    let uid = owner_uid
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("# HELP {metric} {help}\n# TYPE {metric} counter\n{metric}{{ownerUID=\"{uid}\"}} {percent}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_is_monotonic_and_capped() {
        let p = Progress::default();
        p.set_source_total(Some(1000));
        p.add_source(425);
        assert_eq!(p.percent(), 42.5);
        p.add_source(575);
        assert_eq!(p.percent(), 99.99);
        p.set_source_total(Some(1_000_000)); // a smaller ratio must not go backwards
        assert_eq!(p.percent(), 99.99);
        p.complete();
        assert_eq!(p.percent(), 100.0);
    }

    #[test]
    fn exposition_matches_cdi_regex_shape() {
        let t = prometheus_text("8d2c-uid", 42.5);
        assert!(
            t.contains("\nkubevirt_cdi_import_progress_total{ownerUID=\"8d2c-uid\"} 42.5\n"),
            "{t}"
        );
        assert!(prometheus_text("u", 100.0).ends_with("{ownerUID=\"u\"} 100\n"));
    }
}
