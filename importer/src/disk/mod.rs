//! The blocking write half, shared by import, upload, clone and push: the disk plan
//! ([`plan`]), opening and finishing the destination ([`open`]), one stream onto it
//! ([`stream`]), a container image's layers ([`image`], [`layers`], overlay chains in
//! [`chain`], virter images in [`layered`]), and the failures they report ([`errors`]).

mod chain;
mod errors;
mod image;
mod layered;
mod layers;
mod open;
mod plan;
mod stream;

pub use image::write_image;
pub use plan::{DiskPlan, DiskRequest, Inspected, Output, Parsing, StreamSink};
pub use stream::{blocking, write_raw, write_stream};
