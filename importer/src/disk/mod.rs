//! The blocking write half, shared by import, upload, clone and push: the disk plan
//! ([`plan`]), opening and finishing the destination ([`open`]), one stream onto it
//! ([`stream`]), a container image's layers ([`image`], [`layers`], overlay chains in
//! [`chain`], virter images in [`layered`]), a raw disk read extent by extent
//! ([`extents`]), a raw upload continued after a restart ([`resumed`]), a warm migration's delta applied onto the disk ([`delta`]), and the
//! failures they report ([`errors`]).

mod chain;
mod delta;
mod errors;
mod extents;
mod image;
mod layered;
mod layers;
mod open;
mod plan;
mod resumed;
mod stream;

pub use delta::write_delta;
pub use extents::{write_extents, Extent, OpenRange};
pub use image::write_image;
pub use plan::{DiskPlan, DiskRequest, Inspected, Output, Parsing, StreamSink};
pub use resumed::{resumable_after_restart, write_raw_resumed};
pub use stream::{blocking, write_raw, write_stream};
