//! [`UploadServerConfig`]: CDI's upload server environment, checked at start (a bad
//! DEADLINE, certificate, address or `--push-dest` fails before anything listens).

use crate::cli::UploadArgs;
use crate::config::PushConfig;
use crate::disk::{DiskPlan, DiskRequest, Parsing};
use crate::failure::Failure;
use ferrydisk_common::serve::tls;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::SystemTime;

/// Why the upload server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// CDI: klog.Fatal, exit 255.
    #[error("invalid DEADLINE {value:?}: {message}")]
    Deadline { value: String, message: String },
    #[error("invalid TLS config: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("invalid listen address {value:?}: {source}")]
    Address {
        value: String,
        source: std::net::AddrParseError,
    },
    #[error("invalid push settings: {0}")]
    Push(#[from] crate::config::push::ConfigError),
    #[error("{}", .0.message())]
    Disk(Failure),
}

impl StartError {
    /// CDI's exit status for it.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Deadline { .. } => 255,
            _ => 1,
        }
    }
}

pub struct UploadServerConfig {
    pub addr: SocketAddr,
    pub tls: rustls::ServerConfig,
    /// The common name a client certificate must carry; `None`: no client auth.
    pub client_name: Option<String>,
    /// After it, an idle server exits with `deadlinePassed`.
    pub deadline: Option<SystemTime>,
    /// How an upload is written (a disk image), and an archive (unpacked).
    pub disk: DiskPlan,
    pub archive: DiskPlan,
    /// The `ownerUID` label of `/metrics`.
    pub owner_uid: String,
    pub termination_log: PathBuf,
    /// `--push-dest`: the volume pushed once the upload is complete.
    pub push: Option<PushConfig>,
}

impl UploadServerConfig {
    /// CDI's upload server is lenient: a value that does not parse means the default
    /// (a port, PREALLOCATION, the size), except DEADLINE and the certificates.
    pub fn from_args(a: UploadArgs) -> Result<Self, StartError> {
        let deadline = match a.deadline.as_deref().filter(|d| !d.is_empty()) {
            None => None,
            Some(d) => {
                Some(
                    humantime::parse_rfc3339_weak(d).map_err(|e| StartError::Deadline {
                        value: d.to_string(),
                        message: e.to_string(),
                    })?,
                )
            }
        };
        let client_ca = (!a.no_client_auth).then_some(a.client_ca.as_path());
        let tls = tls::server_config(
            &a.tls_cert,
            &a.tls_key,
            tls::ServerTls {
                client_ca,
                min_version: &a.tls_min_version,
                http11_only: false,
            },
        )?;
        let port: u16 = a.listen_port.parse().unwrap_or(8443);
        let host = match a.listen_address.as_str() {
            "" => "0.0.0.0",
            h => h,
        };
        let value = format!("{host}:{port}");
        let addr = value
            .parse()
            .map_err(|source| StartError::Address { value, source })?;
        let plan = |archive| {
            DiskPlan::new(
                DiskRequest {
                    volume: &a.volume,
                    dest: a.dest.as_deref(),
                    archive,
                    preallocation: Some(&a.preallocation),
                    image_size: &a.image_size,
                    checksum: None,
                },
                Parsing::Lenient,
            )
            .map_err(StartError::Disk)
        };
        let (disk, archive) = (plan(false)?, plan(true)?);
        let push = match a.push_dest.as_deref().filter(|d| !d.is_empty()) {
            None => None,
            Some(dest) => Some(PushConfig::for_upload(
                dest,
                disk.dest.path().to_path_buf(),
                &a.push,
            )?),
        };
        Ok(UploadServerConfig {
            addr,
            tls,
            client_name: (!a.no_client_auth).then_some(a.client_name),
            deadline,
            disk,
            archive,
            owner_uid: a.owner_uid,
            termination_log: a.volume.termination_log,
            push,
        })
    }
}
