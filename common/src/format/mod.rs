//! Recognising what a byte stream is, by content alone (never by file name).

pub mod decode_pool;
pub mod held;
pub mod hostread;
pub mod image;
pub mod qcow2;
pub mod sniff;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use sniff::{sniff, Format, SNIFF_LEN};
