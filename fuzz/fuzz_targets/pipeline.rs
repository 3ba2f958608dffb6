#![no_main]
//! The whole data path on arbitrary bytes: detection, every decompressor, tar, every
//! disk format.

use ferrydisk_common::decode::gzip::Integrity;
use ferrydisk_common::pipeline::{write_disk, Options};
use std::sync::Arc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferrydisk_fuzz::run(data, |r, w, o| {
        write_disk(
            r,
            w,
            &Options {
                limit: o.limit,
                source_len: None,
                progress: Arc::default(),
                scratch: None,
                source_file: None,
                // Odd lengths also take the keep-as-qcow2 path (tee + validation).
                keep_qcow2: data.len() % 2 == 1,
                // Lengths 2 and 3 mod 4 skip gzip's CRC, as under a layer digest.
                integrity: if data.len() % 4 >= 2 {
                    Integrity::Digest
                } else {
                    Integrity::Crc
                },
            },
        )
    });
});
