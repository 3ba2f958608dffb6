//! Inflates a gzip stream from stdin to nothing with the decoder the pipeline uses
//! (flate2 on zlib-rs), printing bytes and CPU seconds: the reference for measuring
//! another inflate (ISA-L's `igzip -d`) on the same layer (docs/benchmarks.md).
//!
//!     cargo run -q --release -p ferrydisk-common --example inflate < layer.gz

use std::io::Read;

fn main() -> std::io::Result<()> {
    let stdin = std::io::stdin().lock();
    let mut d =
        flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(1 << 20, stdin));
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let started = std::time::Instant::now();
    loop {
        let n = d.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{total} bytes inflated in {secs:.3} s ({:.0} MB/s)",
        total as f64 / secs / 1e6
    );
    Ok(())
}
