//! [`ImportConfig`]: everything an import needs, parsed and checked before anything
//! touches the network or the disk.

use crate::cli::{parse_go_bool, ImportArgs};
use crate::disk::{DiskPlan, DiskRequest, Parsing};
use crate::failure::Failure;
use crate::sources::client::{self, Proxies};
use crate::sources::image::LayerSelector;
use crate::sources::registry::RegistryOptions;
use crate::sources::s3::Addressing;
use ferrydisk_common::ErrorKind;
use std::path::PathBuf;
use std::time::Duration;

/// `IMPORTER_SOURCE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Http,
    Registry,
    S3,
    Gcs,
    /// oVirt/OLVM through its engine API and ovirt-imageio.
    Imageio,
    /// `none`: a blank disk.
    Blank,
    /// CDI's source ferrydisk does not implement (`vddk`).
    Unsupported(&'static str),
}

impl SourceKind {
    pub fn parse(s: &str) -> Result<Self, Failure> {
        Ok(match s {
            "http" => SourceKind::Http,
            "registry" => SourceKind::Registry,
            "s3" => SourceKind::S3,
            "gcs" => SourceKind::Gcs,
            "none" => SourceKind::Blank,
            "imageio" => SourceKind::Imageio,
            "vddk" => SourceKind::Unsupported("vddk"),
            other => return Err(Failure::UnknownSource(other.to_string())),
        })
    }

    /// CDI's name for it (log lines, termination messages).
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Http => "http",
            SourceKind::Registry => "registry",
            SourceKind::S3 => "s3",
            SourceKind::Gcs => "gcs",
            SourceKind::Imageio => "imageio",
            SourceKind::Blank => "none",
            SourceKind::Unsupported(n) => n,
        }
    }
}

/// How requests are made: credentials, trust, proxies, patience.
#[derive(Debug, Clone, Default)]
pub struct Net {
    /// User and password (an S3 key pair): both given and non-empty, or none.
    pub credentials: Option<(String, String)>,
    /// Registry credentials file (docker `config.json` / containers `auth.json`).
    pub auth_file: Option<PathBuf>,
    /// Directories of extra CA certificates.
    pub ca_dirs: Vec<PathBuf>,
    pub insecure: bool,
    pub proxies: Proxies,
    /// `Name: value` lines (flags, `IMPORTER_EXTRA_HEADER_*`, the secret directory),
    /// sent only to the endpoint's own origin.
    pub extra_headers: Vec<String>,
    pub retries: u32,
    pub refuse_internal_redirects: bool,
    pub idle_timeout: Duration,
}

/// The object-store settings (`s3` source).
#[derive(Debug, Clone)]
pub struct S3 {
    pub region: Option<String>,
    pub addressing: Addressing,
    pub session_token: Option<String>,
}

/// Where images are looked for and which layer is the disk (`registry` source).
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// `amd64`, `arm64/v8`...: the platform picked from an index (`None`: the node's).
    pub arch: Option<String>,
    pub registries_conf: Option<PathBuf>,
    pub layer: LayerSelector,
}

/// Node pull (`pullMethod: node`): the handshake with the containerDisk's server.
#[derive(Debug, Clone, Default)]
pub struct NodePull {
    /// `pullMethod: node`: the image's environment becomes labels.
    pub enabled: bool,
    pub ready_file: Option<PathBuf>,
    pub done_file: Option<PathBuf>,
    pub ready_timeout: Duration,
}

/// An oVirt disk, whole or one stage of a multi-stage (warm) import.
#[derive(Debug, Clone, Default)]
pub struct Imageio {
    pub disk_id: String,
    /// The snapshot (or the disk's image id) this stage copies.
    pub current: Option<String>,
    /// Set with `current`: the stage is a delta onto the disk the previous stage wrote.
    pub previous: Option<String>,
    pub last_stage: bool,
    /// How long a transfer may stay `initializing`.
    pub transfer_timeout: Duration,
    /// Between tries while the disk is locked.
    pub lock_wait: Duration,
}

impl Imageio {
    /// A delta stage: a snapshot applied onto the previous one.
    pub fn is_delta(&self) -> bool {
        self.current.is_some() && self.previous.is_some()
    }
}

/// One import: what to read, how to reach it, where it goes.
pub struct ImportConfig {
    pub source: SourceKind,
    pub endpoint: String,
    /// `file://` endpoints are read (a flag, never from a DataVolume).
    pub allow_local_files: bool,
    pub disk: DiskPlan,
    pub net: Net,
    pub s3: S3,
    pub gcs_credentials: Option<PathBuf>,
    pub registry: Registry,
    pub node: NodePull,
    pub imageio: Imageio,
}

impl ImportConfig {
    /// The importer's edge: CDI's environment and the flags, checked as CDI's importer
    /// checks them (a bad PREALLOCATION, size or content type fails the import).
    pub fn from_args(a: ImportArgs) -> Result<Self, Failure> {
        let archive = match a.content_type.as_str() {
            "" | "kubevirt" => false,
            "archive" => true,
            other => return Err(Failure::Config(format!("Unknown content type: {other}"))),
        };
        let source = SourceKind::parse(&a.source)?;
        let disk = DiskPlan::new(
            DiskRequest {
                volume: &a.volume,
                dest: a.dest.as_deref(),
                archive,
                preallocation: a.preallocation.as_deref(),
                image_size: &a.image_size,
                checksum: a.checksum.as_deref(),
            },
            Parsing::Strict,
        )?;
        let addressing = match source {
            SourceKind::S3 => {
                Addressing::parse(&a.s3_addressing).map_err(|e| Failure::Connect {
                    source_name: "s3".into(),
                    kind: ErrorKind::Config,
                    message: e.to_string(),
                })?
            }
            _ => Addressing::Auto,
        };
        let layer = LayerSelector::parse(a.layer_digest.as_deref(), &a.layer_annotations)
            .map_err(|e| Failure::Config(e.to_string()))?;
        let mut extra_headers =
            client::collect_extra_headers(std::env::vars(), &a.extra_headers_dir);
        extra_headers.extend(a.extra_headers.iter().cloned());
        let mut ca_dirs = vec![a.proxy_cert_dir.clone()];
        ca_dirs.extend(a.cert_dir.clone());
        let nonempty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
        Ok(ImportConfig {
            source,
            endpoint: a.endpoint,
            allow_local_files: a.allow_local_files,
            disk,
            net: Net {
                credentials: nonempty(a.access_key_id).zip(nonempty(a.secret_key)),
                auth_file: a.auth_file,
                ca_dirs,
                insecure: parse_go_bool(&a.insecure_tls).unwrap_or(false),
                proxies: a.proxy.proxies(),
                extra_headers,
                retries: a.retries,
                refuse_internal_redirects: a.refuse_internal_redirects,
                idle_timeout: Duration::from_secs(a.idle_timeout.max(1)),
            },
            s3: S3 {
                region: nonempty(a.s3_region).or_else(|| nonempty(a.aws_region)),
                addressing,
                session_token: nonempty(a.aws_session_token),
            },
            gcs_credentials: a.google_credentials.filter(|p| !p.as_os_str().is_empty()),
            registry: Registry {
                arch: nonempty(a.registry_arch),
                registries_conf: a.registries_conf,
                layer,
            },
            node: NodePull {
                enabled: a.pull_method == "node",
                ready_file: a.ready_file,
                done_file: a.done_file,
                ready_timeout: Duration::from_secs(a.ready_timeout),
            },
            imageio: Imageio {
                disk_id: a.disk_id.unwrap_or_default(),
                current: nonempty(a.current_checkpoint),
                previous: nonempty(a.previous_checkpoint),
                last_stage: a
                    .final_checkpoint
                    .as_deref()
                    .and_then(parse_go_bool)
                    .unwrap_or(false),
                transfer_timeout: Duration::from_secs(a.imageio_transfer_timeout.max(1)),
                lock_wait: Duration::from_secs(a.imageio_lock_wait),
            },
        })
    }

    /// An import into a directory of its own, sized by what the source holds (a push's
    /// spool, `inspect`): no volume request, no preallocation, no overhead, local files
    /// allowed (a user's own command).
    pub fn local(
        source: SourceKind,
        endpoint: String,
        disk: DiskPlan,
        net: Net,
        registry: Registry,
    ) -> Self {
        ImportConfig {
            source,
            endpoint,
            allow_local_files: true,
            disk,
            net,
            s3: S3 {
                region: None,
                addressing: Addressing::Auto,
                session_token: None,
            },
            gcs_credentials: None,
            registry,
            node: NodePull::default(),
            imageio: Imageio::default(),
        }
    }

    /// The registry client's settings for this import's endpoint.
    pub fn registry_options(&self) -> RegistryOptions {
        let (username, password) = self.net.credentials.clone().unzip();
        RegistryOptions {
            username,
            password,
            auth_file: self.net.auth_file.clone(),
            insecure: self.net.insecure,
            ca_dirs: self.net.ca_dirs.clone(),
            arch: self.registry.arch.clone(),
            retries: self.net.retries,
            idle_timeout: self.net.idle_timeout,
            proxies: self.net.proxies.clone(),
            registries_conf: self.registry.registries_conf.clone(),
        }
    }
}
