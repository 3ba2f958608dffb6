#![no_main]
//! gzip, differentially: our member framing (`decode::gzip`) against flate2's
//! `MultiGzDecoder` on arbitrary bytes. Ours must never accept what flate2 refuses, and
//! where both accept, the bytes must be the same; with a digest vouching for the input
//! (no CRC pass) it must give the same bytes wherever the CRC-checked mode does. Output
//! is capped at 64 MiB (a deflate bomb is not the question here).

use std::io::Read;

const CAP: u64 = 64 << 20;

fn run(r: impl Read) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.take(CAP).read_to_end(&mut out)?;
    Ok(out)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    use ferrydisk_common::decode::gzip::{GzipReader, Integrity};
    let ours = run(GzipReader::new(data, Integrity::Crc));
    let theirs = run(flate2::read::MultiGzDecoder::new(data));
    if let Ok(o) = &ours {
        match &theirs {
            Ok(t) => assert_eq!(o, t, "ours and flate2 differ"),
            Err(e) => {
                // Both stopped at the cap: flate2 may not have reached its error yet.
                assert!(
                    o.len() as u64 == CAP,
                    "ours accepted what flate2 refuses: {e}"
                )
            }
        }
        let digest =
            run(GzipReader::new(data, Integrity::Digest)).expect("a digest only skips checks");
        assert_eq!(&digest, o);
    }
});
