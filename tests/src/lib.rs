//! Helpers for the end-to-end tests, by concern: finding and running the built binaries
//! (`bins`), the test HTTP server and other Python helpers (`httpserver`), fixtures made
//! with qemu-img (`fixtures`), byte-for-byte comparison (`compare`), and the importer run
//! the way a CDI pod runs it (`runner`). Everything is re-exported at the root.

pub mod bins;
pub mod clone;
pub mod compare;
pub mod fixtures;
pub mod httpserver;
pub mod objstore;
pub mod registry;
pub mod runner;
pub mod token;
pub mod tokenserver;
pub mod upload;

pub use bins::*;
pub use compare::*;
pub use fixtures::*;
pub use httpserver::*;
pub use runner::*;
