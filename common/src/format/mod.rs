//! Recognising what a byte stream is, by content alone (never by file name).

pub mod qcow2;
pub mod sniff;

pub use sniff::{sniff, Format, SNIFF_LEN};
