//! qcow2 (versions 2 and 3), read as a stream: no qemu-img, no scratch for images whose
//! tables precede their data (what qemu-img writes).

pub mod header;
pub mod layers;
pub mod stream;
pub mod wanted;

pub use header::{Compression, Header, Qcow2Error};
pub use stream::convert;
