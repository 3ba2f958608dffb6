//! The CDI contract pieces a data-plane binary speaks (docs/cdi-contract.md): the
//! termination message, CDI's size arithmetic and its size-limit error, image labels,
//! klog-style flags and the upload endpoints.

pub mod klog;
pub mod labels;
pub mod space;
pub mod termination;
pub mod upload;
