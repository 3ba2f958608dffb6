#![no_main]
//! The vhdx converter on arbitrary bytes, plus its table parsers on small inputs (a
//! whole VHDX is at least 3 MiB, which mutates slowly). Checksums are not enforced under
//! `cfg(fuzzing)`, so mutations get past them.

use ferrydisk_common::format::vhdx;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() >= 8192 {
        let _ = vhdx::current_header(&data[..4096], &data[4096..8192]);
    }
    let mut table = data.to_vec();
    table.resize(64 * 1024 + 4096, 0);
    let _ = vhdx::parse_regions(&table[..64 * 1024]);
    let _ = vhdx::parse_metadata(&table);
    let _ = vhdx::log_needs_replay(&table, &[1; 16]);
    ferrydisk_fuzz::run(data, vhdx::convert);
});
