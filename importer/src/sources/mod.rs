//! Where image bytes come from.

pub mod blank;
pub mod client;
pub mod http;
pub mod redact;
pub mod registry;
