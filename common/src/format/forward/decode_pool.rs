//! Decompressing clusters (qcow2) or grains (vmdk) on every core while the reading
//! thread keeps parsing. Compressed images are bound by inflate speed, one core's worth
//! in a sequential converter; here the reader hands each compressed unit to a worker and
//! writes the results as they come back (the writer takes random offsets). In-flight
//! units are bounded, so memory stays a few buffers per worker.

use std::io;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Decodes `input` into all of `out`; returns the input bytes really used.
pub type DecodeFn = dyn Fn(&[u8], &mut [u8]) -> io::Result<u64> + Send + Sync;

/// One compressed unit and where its decoded bytes go.
pub struct Job {
    pub guest: u64,
    pub input: Vec<u8>,
    /// Sized to the decoded unit.
    pub out: Vec<u8>,
}

pub struct Done {
    pub guest: u64,
    pub input: Vec<u8>,
    pub out: Vec<u8>,
    pub result: io::Result<u64>,
}

/// Output bytes the pool may keep in flight to give every worker work, beyond the
/// caller's own budget.
pub const MAX_PARALLEL_BYTES: usize = 16 << 20;

/// How many units may be in flight: `max_bytes` of output, or four per worker as long as
/// that stays within [`MAX_PARALLEL_BYTES`]; never fewer than one. Bounded by bytes, not
/// by count: a unit may be an 8 MiB vmdk grain.
fn in_flight_units(threads: usize, unit: usize, max_bytes: usize) -> usize {
    let unit = unit.max(1);
    let by_budget = max_bytes / unit;
    let for_parallelism = (4 * threads).min(MAX_PARALLEL_BYTES / unit);
    by_budget.max(for_parallelism).max(1)
}

pub struct DecodePool {
    tx: Option<SyncSender<Job>>,
    rx: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    in_flight: usize,
    max_in_flight: usize,
    /// Buffers of finished jobs, reused for the next ones.
    spare: Vec<(Vec<u8>, Vec<u8>)>,
    /// No workers (one core): decode on the caller's thread.
    inline: Option<Arc<DecodeFn>>,
}

impl DecodePool {
    /// A pool sized to the CPUs this process may use (cgroup quota included), with at
    /// most `max_bytes` of decoded output in flight (at least two units per worker).
    pub fn new(decode: Arc<DecodeFn>, unit: usize, max_bytes: usize) -> Self {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(8);
        Self::with_threads(decode, threads, unit, max_bytes)
    }

    pub fn with_threads(
        decode: Arc<DecodeFn>,
        threads: usize,
        unit: usize,
        max_bytes: usize,
    ) -> Self {
        let (done_tx, rx) = mpsc::channel::<Done>();
        if threads <= 1 {
            return DecodePool {
                tx: None,
                rx,
                workers: Vec::new(),
                in_flight: 0,
                max_in_flight: 1,
                spare: Vec::new(),
                inline: Some(decode),
            };
        }
        let max_in_flight = in_flight_units(threads, unit, max_bytes);
        let (tx, job_rx) = mpsc::sync_channel::<Job>(max_in_flight);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let workers = (0..threads)
            .map(|i| {
                let job_rx = job_rx.clone();
                let done_tx = done_tx.clone();
                let decode = decode.clone();
                std::thread::Builder::new()
                    .name(format!("inflate-{i}"))
                    .spawn(move || loop {
                        let job = match job_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(mut job) = job else { return };
                        let result = run_decode(&decode, &job.input, &mut job.out);
                        let done = Done {
                            guest: job.guest,
                            input: job.input,
                            out: job.out,
                            result,
                        };
                        if done_tx.send(done).is_err() {
                            return;
                        }
                    })
                    .expect("spawning a decode thread")
            })
            .collect();
        DecodePool {
            tx: Some(tx),
            rx,
            workers,
            in_flight: 0,
            max_in_flight,
            spare: Vec::new(),
            inline: None,
        }
    }

    /// An input buffer (empty) and an output buffer of `out_len` bytes, reused if possible.
    pub fn buffers(&mut self, out_len: usize) -> (Vec<u8>, Vec<u8>) {
        let (mut input, mut out) = self.spare.pop().unwrap_or_default();
        input.clear();
        out.resize(out_len, 0);
        (input, out)
    }

    /// Gives back the buffers of a [`Done`] the caller has written.
    pub fn recycle(&mut self, input: Vec<u8>, out: Vec<u8>) {
        if self.spare.len() < self.max_in_flight {
            self.spare.push((input, out));
        }
    }

    /// Queues `job`; results that are ready (and, when the queue is full, the oldest
    /// one) are handed to `on_done` on this thread.
    pub fn submit<E>(
        &mut self,
        mut job: Job,
        on_done: &mut dyn FnMut(&mut Self, Done) -> Result<(), E>,
    ) -> Result<(), E> {
        if let Some(decode) = self.inline.clone() {
            let result = run_decode(&decode, &job.input, &mut job.out);
            let done = Done {
                guest: job.guest,
                input: job.input,
                out: job.out,
                result,
            };
            return on_done(self, done);
        }
        while self.in_flight >= self.max_in_flight {
            self.wait_one(on_done)?;
        }
        while let Ok(d) = self.rx.try_recv() {
            self.in_flight -= 1;
            on_done(self, d)?;
        }
        // Dropping a unit would leave zeros where data belongs and still report success.
        let tx = self
            .tx
            .as_ref()
            .expect("a pool with workers has a job channel");
        tx.send(job)
            .expect("decode workers outlive the pool's job channel");
        self.in_flight += 1;
        Ok(())
    }

    /// Waits for every queued job.
    pub fn finish<E>(
        &mut self,
        on_done: &mut dyn FnMut(&mut Self, Done) -> Result<(), E>,
    ) -> Result<(), E> {
        while self.in_flight > 0 {
            self.wait_one(on_done)?;
        }
        Ok(())
    }

    fn wait_one<E>(
        &mut self,
        on_done: &mut dyn FnMut(&mut Self, Done) -> Result<(), E>,
    ) -> Result<(), E> {
        match self.rx.recv() {
            Ok(d) => {
                self.in_flight -= 1;
                on_done(self, d)
            }
            // Workers hold the result channel while `tx` lives: units in flight were
            // lost, and reporting success would leave holes in the disk.
            Err(_) => panic!(
                "decode workers exited with {} units in flight",
                self.in_flight
            ),
        }
    }
}

/// A decoder panic comes back as this unit's error: a unit that never reports would
/// leave [`DecodePool::finish`] waiting forever. (Release builds abort on panic, so the
/// import fails either way; this keeps debug builds and tests from hanging.)
fn run_decode(decode: &Arc<DecodeFn>, input: &[u8], out: &mut [u8]) -> io::Result<u64> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode(input, out)))
        .unwrap_or_else(|_| Err(io::Error::other("decoder panicked")))
}

impl Drop for DecodePool {
    fn drop(&mut self) {
        self.tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_in_flight_are_bounded_by_size_not_count() {
        // Small units: the budget, and enough for every worker.
        assert_eq!(in_flight_units(2, 64 << 10, 4 << 20), 64);
        assert_eq!(in_flight_units(8, 2 << 20, 4 << 20), 8);
        // Large units: as many as 16 MiB allows, at least one.
        assert_eq!(in_flight_units(2, 8 << 20, 4 << 20), 2);
        assert_eq!(in_flight_units(8, 64 << 20, 4 << 20), 1);
    }

    fn upper(input: &[u8], out: &mut [u8]) -> io::Result<u64> {
        if input.first() == Some(&b'#') {
            panic!("decoder bug");
        }
        if input.first() == Some(&b'!') {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bang"));
        }
        for (o, i) in out.iter_mut().zip(input) {
            *o = i.to_ascii_uppercase();
        }
        Ok(input.len() as u64)
    }

    fn run(threads: usize) -> (Vec<(u64, Vec<u8>)>, usize) {
        let mut pool = DecodePool::with_threads(Arc::new(upper), threads, 4, 16);
        let mut got = Vec::new();
        let mut errors = 0;
        let mut on_done = |p: &mut DecodePool, d: Done| -> Result<(), ()> {
            match d.result {
                Ok(_) => got.push((d.guest, d.out.clone())),
                Err(_) => errors += 1,
            }
            p.recycle(d.input, d.out);
            Ok(())
        };
        for i in 0..100u64 {
            let (mut input, out) = pool.buffers(4);
            input.extend_from_slice(match i {
                50 => b"!bad",
                70 => b"#bug",
                _ => b"abcd",
            });
            pool.submit(
                Job {
                    guest: i,
                    input,
                    out,
                },
                &mut on_done,
            )
            .expect("submit");
        }
        pool.finish(&mut on_done).expect("finish");
        got.sort();
        (got, errors)
    }

    #[test]
    fn every_job_comes_back_once_even_when_its_decoder_panics() {
        for threads in [1, 2, 4] {
            let (got, errors) = run(threads);
            // The corrupt unit and the one whose decoder panicked come back as errors;
            // nothing is lost and nothing hangs.
            assert_eq!(errors, 2);
            assert_eq!(got.len(), 98);
            assert!(got.iter().all(|(_, o)| o == b"ABCD"));
            assert!(!got.iter().any(|(g, _)| *g == 50 || *g == 70));
        }
    }
}
