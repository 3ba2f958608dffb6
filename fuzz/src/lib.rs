//! Shared harness: run a converter over fuzzer bytes into a discarding writer, with a
//! volume limit small enough that no input makes us write gigabytes.

use ferrydisk_common::format::contract::StreamOptions;
use ferrydisk_common::sink::discard::DiscardTarget;
use ferrydisk_common::sink::sparse::{SparseWriter, WriterOptions};

/// The largest disk a fuzz input may claim (and the writer's cap).
pub const LIMIT: u64 = 64 << 20;

pub fn run<T, E>(
    data: &[u8],
    convert: impl FnOnce(&mut dyn std::io::Read, &mut SparseWriter, &StreamOptions) -> Result<T, E>,
) {
    let mut w = SparseWriter::spawn(
        Box::new(DiscardTarget::default()),
        WriterOptions {
            limit: LIMIT,
            ..Default::default()
        },
    );
    let opts = StreamOptions {
        scratch: None,
        hold_memory: 8 << 20,
        limit: LIMIT,
        source_file: None,
        source_len: Some(data.len() as u64),
        layers: None,
    };
    let mut src = data;
    match convert(&mut src, &mut w, &opts) {
        Ok(_) => {
            let _ = w.finish(0);
        }
        Err(_) => w.abort(),
    }
}
