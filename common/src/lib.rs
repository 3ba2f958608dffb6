//! The ferrydisk streaming pipeline: `Source -> decode layers -> format -> Sink`.
//!
//! Everything here is I/O-policy free: the binaries decide where bytes come from and
//! where they go; this crate turns a byte stream into a disk image on a sink in bounded
//! memory. The pipeline is built from blocking `std::io::Read` adapters because every
//! decoder we use (flate2, liblzma, zstd, bzip2, tar) is synchronous and CPU-bound; async
//! sources hand their bytes in through [`stream::ChannelReader`], which applies
//! back-pressure to the network.

// Linked for its "std" feature only (runtime CPU detection in flate2's zlib-rs).
use zlib_rs as _;

pub mod cdi;
pub mod checksum;
pub mod decode;
pub mod error;
pub mod format;
pub mod origin;
pub mod pipeline;
pub mod progress;
pub mod readahead;
pub mod resume;
#[cfg(feature = "server")]
pub mod serve;
pub mod sink;
pub mod sniff;
pub mod stream;
#[cfg(feature = "server")]
pub mod tls_failure;
pub mod tus;

pub use error::ErrorKind;
