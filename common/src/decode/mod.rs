//! Decoding layers, each a `Read -> Read` adapter: compression (gzip, xz on every
//! core the pod may use, zstd, bzip2) and tar (pick the one disk file, or unpack an
//! archive safely).

pub mod compression;
pub mod containerdisk;
pub mod gzip;
pub mod peek;
pub mod tar;
pub mod xz;

pub use compression::decompressor;
pub use peek::PeekReader;
