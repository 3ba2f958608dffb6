//! Where image bytes come from.

pub mod blank;
pub mod client;
pub mod http;
pub mod image;
pub mod local_image;
pub mod redact;
pub mod registry;
