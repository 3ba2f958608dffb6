//! Why a push failed: one enum for every stage, each variant naming what it was doing.
//! The push prints it in one line; conditions that change the route (no length, data
//! out of order) are not errors but [`super::streamed::Streamed`] outcomes.

use crate::config::push::ConfigError;
use crate::net::registry::ApiError;
use ferrydisk_common::error::chain_line;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum PushFailure {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Connect(#[from] super::connect::ConnectError),
    #[error("{}", chain_line(.0))]
    Registry(#[from] ApiError),
    #[error(transparent)]
    Spool(#[from] super::spool::SpoolError),
    #[error(transparent)]
    Save(#[from] SaveError),
    #[error("{what} {shown}: {source}")]
    Source {
        what: &'static str,
        shown: String,
        source: io::Error,
    },
    #[error("{shown}: {message}")]
    Probe { shown: String, message: String },
    #[error("{shown} changed while it was pushed (layer {before} then {after})")]
    Changed {
        shown: String,
        before: String,
        after: String,
    },
    #[error(
        "a KubeVirt VM artifact holds raw disks compressed with zstd; this layer would be {0}"
    )]
    NotRawZstd(String),
    #[error("the measuring pass ended without a result")]
    NotMeasured,
    #[error("laying out the qcow2: {0}")]
    Qcow2Layout(String),
    #[error("the stream ended without its digest")]
    NoDigest,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("disk {name}: {source}")]
    Disk {
        name: String,
        source: Box<PushFailure>,
    },
}

/// Why a local save failed.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("a docker-archive holds a container image with uncompressed tar layers: save an artifact or a zstd layer as oci: or oci-archive:")]
    NotDockerArchive,
    #[error("saving {dest}: {source}")]
    Io { dest: String, source: io::Error },
}
