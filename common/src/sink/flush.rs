//! Write-behind for buffered destinations: a checkpoint hands "make `[0, upto)` durable
//! and drop it from the page cache" to a flusher thread and returns, so the disk writes
//! back one window while the pipeline fills the next. The writer waits only when it is
//! a whole window ahead of the disk: at most two windows are dirty at a time, which keeps
//! a pod's page cache (its memory cgroup charge) bounded, as the synchronous checkpoint
//! did, without stopping the network and the decoders at every checkpoint.

use rustix::fs::{fadvise, fdatasync, Advice};
use std::fs::File;
use std::io;
use std::num::NonZeroU64;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

pub(crate) struct Flusher {
    tx: Option<SyncSender<u64>>,
    done: Receiver<io::Result<()>>,
    busy: bool,
    thread: Option<JoinHandle<()>>,
}

fn gone() -> io::Error {
    io::Error::other("the flusher thread stopped")
}

impl Flusher {
    pub(crate) fn new(file: &File) -> io::Result<Self> {
        let f = file.try_clone()?;
        let (tx, rx) = sync_channel::<u64>(1);
        let (done_tx, done) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("flusher".into())
            .spawn(move || {
                for upto in rx {
                    let r = fdatasync(&f).map_err(io::Error::from).map(|()| {
                        // Written pages are clean now: dropping them keeps the page cache
                        // flat however large the image is.
                        let _ = fadvise(&f, 0, NonZeroU64::new(upto), Advice::DontNeed);
                    });
                    if done_tx.send(r).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Flusher {
            tx: Some(tx),
            done,
            busy: false,
            thread: Some(thread),
        })
    }

    /// Waits for the previous checkpoint (and returns its error), then starts this one.
    pub(crate) fn checkpoint(&mut self, upto: u64) -> io::Result<()> {
        self.wait()?;
        let tx = self.tx.as_ref().ok_or_else(gone)?;
        tx.send(upto).map_err(|_| gone())?;
        self.busy = true;
        Ok(())
    }

    /// Waits for the checkpoint in flight, if any.
    pub(crate) fn wait(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.busy) {
            return Ok(());
        }
        self.done.recv().map_err(|_| gone())?
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A checkpoint through `flusher`, started on first use; synchronous if no thread can
/// be had.
pub(crate) fn checkpoint(flusher: &mut Option<Flusher>, file: &File, upto: u64) -> io::Result<()> {
    if flusher.is_none() {
        match Flusher::new(file) {
            Ok(f) => *flusher = Some(f),
            Err(e) => {
                tracing::debug!(error = %e, "no flusher thread; checkpointing synchronously");
                fdatasync(file)?;
                let _ = fadvise(file, 0, NonZeroU64::new(upto), Advice::DontNeed);
                return Ok(());
            }
        }
    }
    match flusher {
        Some(f) => f.checkpoint(upto),
        None => Ok(()),
    }
}

/// Waits for the checkpoint in flight before the final sync (its error comes first).
pub(crate) fn settle(flusher: &mut Option<Flusher>) -> io::Result<()> {
    match flusher {
        Some(f) => f.wait(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn checkpoints_overlap_writes_and_report_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("disk.img"))
            .expect("create");
        let mut fl = None;
        for i in 0..8u64 {
            f.write_all_at(&[i as u8 + 1; 1 << 16], i << 16)
                .expect("write");
            checkpoint(&mut fl, &f, (i + 1) << 16).expect("checkpoint");
        }
        settle(&mut fl).expect("settle");
        settle(&mut fl).expect("nothing in flight: no wait");
        drop(fl);
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 7 << 16).expect("read");
        assert_eq!(b[0], 8);
    }
}
