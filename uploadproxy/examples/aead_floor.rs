//! The AEAD floor of the proxy's hop: what one open plus one seal of every byte costs
//! with the crypto the proxy's rustls uses (ring), in TLS 1.3 records of 16 KiB, for
//! each cipher suite it offers. `scripts/bench upload` runs it next to the proxy so
//! the proxy's CPU per GiB is compared with it in the same run.
//!
//!   cargo run --release -p ferrydisk-uploadproxy --example aead_floor [GIB]
//!
//! Prints one line per cipher: `<name> <CPU s per GiB for open + seal>`.

use ring::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use std::time::Instant;

const RECORD: usize = 16 << 10;

fn main() {
    let gib: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let records = ((gib * (1u64 << 30) as f64) / RECORD as f64) as u64;
    for (name, alg) in [
        ("TLS13_AES_256_GCM_SHA384", &AES_256_GCM),
        ("TLS13_AES_128_GCM_SHA256", &AES_128_GCM),
        ("TLS13_CHACHA20_POLY1305_SHA256", &CHACHA20_POLY1305),
    ] {
        let key_bytes = vec![7u8; alg.key_len()];
        let sealer = LessSafeKey::new(UnboundKey::new(alg, &key_bytes).expect("key"));
        let opener = LessSafeKey::new(UnboundKey::new(alg, &key_bytes).expect("key"));
        // A record as TLS 1.3 carries it: payload, content type, tag.
        let mut rec = vec![0x5au8; RECORD + 1];
        let aad = [23u8, 3, 3, 0x40, 0x11];
        let start = cpu_seconds();
        let wall = Instant::now();
        for i in 0..records {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&i.to_be_bytes());
            let tag = sealer
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    &mut rec,
                )
                .expect("seal");
            rec.extend_from_slice(tag.as_ref());
            let n = opener
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    &mut rec,
                )
                .expect("open")
                .len();
            rec.truncate(n);
        }
        let cpu = cpu_seconds() - start;
        let per_gib = cpu / (records as f64 * RECORD as f64 / (1u64 << 30) as f64);
        println!(
            "{name} {per_gib:.3} (wall {:.2} s for {gib} GiB)",
            wall.elapsed().as_secs_f64()
        );
    }
}

/// This process's user + system CPU time.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // /proc counts clock ticks of 1/100 s on Linux.
    (ticks(11) + ticks(12)) / 100.0
}
