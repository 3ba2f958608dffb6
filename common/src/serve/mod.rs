//! Server plumbing shared by the importer's servers (upload server, progress metric)
//! and the upload proxy, behind the `server` feature so the pipeline (and its fuzz
//! targets) build without hyper and rustls: one TLS provider and PEM loader, one
//! guarded listener, one TLS + HTTP/1.1 connection task, one lingering close, one
//! logging and runtime setup.

pub mod conn;
pub mod linger;
pub mod listen;
pub mod process;
pub mod tls;
