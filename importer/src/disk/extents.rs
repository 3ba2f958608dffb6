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

/// Writes the disk of `size` bytes whose runs are `extents` (contiguous from 0),
/// reading each data extent through `open(start, length)`.
pub fn write_extents(
    plan: &DiskPlan,
    size: u64,
    extents: &[Extent],
    open: &mut dyn FnMut(u64, u64) -> std::io::Result<Box<dyn Read>>,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let data: u64 = extents.iter().filter(|e| !e.zero).map(|e| e.length).sum();
    progress.set_source_total(Some(data));
    progress.set_virtual_total(Some(size));
    let mut disk = open_disk(plan, progress.clone(), Some(data))?;
    let sink = |e: SinkError| process_failure(PipelineError::Sink(e));
    let result = (|| {
        disk.writer.prepare_random(size).map_err(sink)?;
        let mut buf = vec![0u8; 1 << 20];
        for e in extents.iter().filter(|e| !e.zero) {
            let mut r = open(e.start, e.length)
                .map_err(|err| io_fail(format!("reading bytes {}+{}", e.start, e.length), err))?;
            let mut at = e.start;
            while at < e.start + e.length {
                let want = buf.len().min((e.start + e.length - at) as usize);
                let n = r
                    .read(&mut buf[..want])
                    .map_err(|err| io_fail(format!("reading byte {at}"), err))?;
                if n == 0 {
                    return Err(io_fail(
                        format!("the extent at {} ended at {at}", e.start),
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
                disk.writer.write_at(at, &buf[..n]).map_err(sink)?;
                progress.add_source(n as u64);
                progress.add_decoded(n as u64);
                at += n as u64;
            }
        }
        Ok(())
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
