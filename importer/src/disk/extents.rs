//! A raw disk written extent by extent (ovirt-imageio's `/extents`): only the data
//! extents are read, each at its own offset; zero extents stay holes (a block device is
//! zeroed first, as for any random-order write).

use super::errors::{io_fail, process_failure};
use super::open::{finish_disk, open_disk};
use super::plan::DiskPlan;
use crate::failure::Failure;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::pipeline::{PipelineError, Report};
use ferrydisk_common::progress::Progress;
use ferrydisk_common::sink::SinkError;
use ferrydisk_common::sniff::Format;
use std::io::Read;
use std::sync::Arc;

/// One run of the disk: `[start, start + length)`, data or zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub zero: bool,
}

/// Opens `[start, start + length)` of the source for reading.
pub type OpenRange = dyn Fn(u64, u64) -> std::io::Result<Box<dyn Read>> + Send + Sync;

/// The data is read in pieces of at most this many bytes, each over one request.
const PIECE: u64 = 32 << 20;
/// Pieces read and not yet written, at most (1 MiB each).
const QUEUED: usize = 8;

/// Writes the disk of `size` bytes whose runs are `extents` (contiguous from 0),
/// reading the data extents through `open(start, length)` on `readers` connections at
/// once (the daemon serves each connection from one thread; a single one is bounded by
/// it), while this thread writes what they read, in bounded memory.
pub fn write_extents(
    plan: &DiskPlan,
    size: u64,
    extents: &[Extent],
    open: Arc<OpenRange>,
    readers: usize,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let data: u64 = extents.iter().filter(|e| !e.zero).map(|e| e.length).sum();
    progress.set_source_total(Some(data));
    progress.set_virtual_total(Some(size));
    let mut pieces = std::collections::VecDeque::new();
    for e in extents.iter().filter(|e| !e.zero) {
        let mut at = e.start;
        while at < e.start + e.length {
            let len = PIECE.min(e.start + e.length - at);
            pieces.push_back((at, len));
            at += len;
        }
    }
    let mut disk = open_disk(plan, progress.clone(), Some(data))?;
    let sink = |e: SinkError| process_failure(PipelineError::Sink(e));
    let result = (|| {
        disk.writer.prepare_random(size).map_err(sink)?;
        let queue = Arc::new(std::sync::Mutex::new(pieces));
        // Buffers go back to the readers once written: at most QUEUED + readers exist.
        let free: Arc<Pool> = Arc::default();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(u64, Vec<u8>), Failure>>(QUEUED);
        let workers: Vec<_> = (0..readers.max(1))
            .map(|_| {
                let (queue, free, tx, open) =
                    (queue.clone(), free.clone(), tx.clone(), open.clone());
                std::thread::spawn(move || read_pieces(&queue, &free, &tx, open.as_ref()))
            })
            .collect();
        drop(tx);
        let mut written = Ok(());
        let mut total = 0u64;
        for got in rx.iter() {
            match got
                .and_then(|(at, buf)| disk.writer.write_at(at, &buf).map_err(sink).map(|()| buf))
            {
                Ok(buf) => {
                    let n = buf.len() as u64;
                    total += n;
                    progress.add_source(n);
                    progress.add_decoded(n);
                    if let Ok(mut f) = free.lock() {
                        f.push(buf);
                    }
                }
                Err(f) => {
                    written = Err(f);
                    break;
                }
            }
        }
        // Every data byte came, or the disk is not reported (a reader that stopped
        // without saying why leaves a gap).
        if written.is_ok() && total != data {
            written = Err(io_fail(
                format!("{total} of the image's {data} data bytes were read"),
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        // Stops the readers (their sends fail) before they are joined.
        drop(rx);
        for w in workers {
            let _ = w.join();
        }
        written
    })();
    match result {
        Ok(()) => {
            let report = Report {
                format: Some(Format::Raw),
                virtual_size: size,
                ..Default::default()
            };
            finish_disk(plan, disk, &report, None)
        }
        Err(f) => {
            disk.writer.abort();
            Err(f)
        }
    }
}

/// Buffers the writer is done with.
type Pool = std::sync::Mutex<Vec<Vec<u8>>>;

/// Bytes per buffer handed from a reader to the writer.
const CHUNK: usize = 1 << 20;

/// One reader: takes pieces off the queue until it is empty (or the writer stopped),
/// sending each as 1 MiB chunks in buffers the writer hands back.
fn read_pieces(
    queue: &std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>,
    free: &Pool,
    tx: &std::sync::mpsc::SyncSender<Result<(u64, Vec<u8>), Failure>>,
    open: &OpenRange,
) {
    loop {
        let Some((start, len)) = queue.lock().ok().and_then(|mut q| q.pop_front()) else {
            return;
        };
        let sent = (|| {
            let mut r =
                open(start, len).map_err(|e| io_fail(format!("reading bytes {start}+{len}"), e))?;
            let mut at = start;
            while at < start + len {
                let want = CHUNK.min((start + len - at) as usize);
                let mut buf = free
                    .lock()
                    .ok()
                    .and_then(|mut f| f.pop())
                    .unwrap_or_default();
                buf.resize(want, 0);
                let mut filled = 0;
                while filled < buf.len() {
                    let n = r
                        .read(&mut buf[filled..])
                        .map_err(|e| io_fail(format!("reading byte {}", at + filled as u64), e))?;
                    if n == 0 {
                        return Err(io_fail(
                            format!("the range at {start} ended at {}", at + filled as u64),
                            std::io::ErrorKind::UnexpectedEof.into(),
                        ));
                    }
                    filled += n;
                }
                if tx.send(Ok((at, buf))).is_err() {
                    return Ok(false);
                }
                at += filled as u64;
            }
            Ok(true)
        })();
        match sent {
            Ok(true) => {}
            Ok(false) => return,
            Err(f) => {
                let _ = tx.send(Err(f));
                return;
            }
        }
    }
}
