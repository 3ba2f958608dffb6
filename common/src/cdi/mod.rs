//! The CDI contract pieces a data-plane binary speaks (`../shared/spec/cdi-contract.md`):
//! the termination message, CDI's size arithmetic and its size-limit error, image labels
//! and klog-style flags.

pub mod klog;
pub mod labels;
pub mod space;
pub mod termination;
