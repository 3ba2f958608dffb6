//! Where image bytes come from.

pub mod client;
pub mod gcs;
pub mod http;
pub mod image;
pub mod imageio;
pub mod local_image;
pub mod mirrors;
pub mod node;
pub mod redact;
pub mod reference;
pub mod registry;
pub mod resume;
pub mod s3;
