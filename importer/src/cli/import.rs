//! `import` and `inspect`: what to read, how to reach it (CDI's importer environment).

use super::{InspectOutput, ProxyArgs, VolumeArgs};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct ImportArgs {
    /// Where the disk goes and how it is written (shared with the other subcommands).
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// Panics on purpose: the end-to-end test of the panic hook (termination message).
    #[arg(long = "internal-panic-test", hide = true)]
    pub internal_panic_test: bool,

    // ---- what to import ----
    /// Source type: http, registry, s3, gcs, imageio, none (blank disk). CDI's vddk
    /// source is refused with a one-line error (it needs VMware's proprietary library).
    #[arg(long, env = "IMPORTER_SOURCE", default_value = "http")]
    pub source: String,
    /// URL of the image (http(s)://..., or file:///path with --allow-local-files).
    #[arg(long, env = "IMPORTER_ENDPOINT", default_value = "")]
    pub endpoint: String,
    /// Accept `file://` endpoints. Only a flag, never an env var: the endpoint of a CDI
    /// import comes from the user's DataVolume, and must not read the pod's own files.
    #[arg(long)]
    pub allow_local_files: bool,
    /// `kubevirt` (a disk image, written raw) or `archive` (a tar unpacked into --data-dir).
    #[arg(
        long = "content-type",
        env = "IMPORTER_CONTENTTYPE",
        default_value = "kubevirt"
    )]
    pub content_type: String,
    /// Requested size as a Kubernetes quantity (PVC request), e.g. 10Gi.
    #[arg(long = "image-size", env = "IMPORTER_IMAGE_SIZE", default_value = "")]
    pub image_size: String,
    /// Expected checksum of the source bytes, `md5|sha1|sha256|sha512:<hex>`; several
    /// separated by commas must all match.
    #[arg(long, env = "IMPORTER_CHECKSUM")]
    pub checksum: Option<String>,

    // ---- credentials and transport ----
    /// Username for basic auth (from the user's Secret key accessKeyId).
    #[arg(
        long = "access-key-id",
        env = "IMPORTER_ACCESS_KEY_ID",
        hide_env_values = true
    )]
    pub access_key_id: Option<String>,
    /// Password for basic auth (from the user's Secret key secretKey).
    #[arg(
        long = "secret-key",
        env = "IMPORTER_SECRET_KEY",
        hide_env_values = true
    )]
    pub secret_key: Option<String>,
    /// S3 region to sign for [default: the AWS host's, else AWS_REGION, else us-east-1].
    #[arg(long = "s3-region", env = "FERRYDISK_S3_REGION")]
    pub s3_region: Option<String>,
    /// The region the AWS tools use, when --s3-region is not given.
    #[arg(long = "aws-region", env = "AWS_REGION", hide = true)]
    pub aws_region: Option<String>,
    /// An STS session token signed with temporary keys (`x-amz-security-token`).
    #[arg(
        long = "aws-session-token",
        env = "AWS_SESSION_TOKEN",
        hide = true,
        hide_env_values = true
    )]
    pub aws_session_token: Option<String>,
    /// S3 addressing: `auto` (path-style for an explicit endpoint, as CDI; virtual-hosted
    /// for AWS), `path` or `virtual`.
    #[arg(
        long = "s3-addressing",
        env = "FERRYDISK_S3_ADDRESSING",
        default_value = "auto"
    )]
    pub s3_addressing: String,
    /// Service-account key (JSON) for the gcs source; anonymous without one.
    #[arg(long = "gcs-credentials", env = "GOOGLE_APPLICATION_CREDENTIALS")]
    pub google_credentials: Option<PathBuf>,
    /// Directory of extra CA certificates (PEM), every non-dot file.
    #[arg(long = "cert-dir", env = "IMPORTER_CERT_DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Directory of the cluster proxy's CA bundle (CDI reads /proxycerts/ whatever this says).
    #[arg(
        long = "proxy-cert-dir",
        env = "IMPORTER_PROXY_CERT_DIR",
        default_value = "/proxycerts/"
    )]
    pub proxy_cert_dir: PathBuf,
    /// Skip TLS verification (Go ParseBool syntax; invalid means false).
    #[arg(long = "insecure-tls", env = "INSECURE_TLS", default_value = "false")]
    pub insecure_tls: String,
    /// Registry credentials file (docker `config.json` / containers `auth.json`), used when
    /// IMPORTER_ACCESS_KEY_ID/IMPORTER_SECRET_KEY are not set.
    #[arg(long = "auth-file", env = "REGISTRY_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// Extra request header `Name: value`; repeatable. IMPORTER_EXTRA_HEADER_* env vars are
    /// added too. Like credentials, they go only to the endpoint's own scheme, host and
    /// port: a redirect to another origin is followed without them.
    #[arg(long = "extra-header", value_name = "HEADER")]
    pub extra_headers: Vec<String>,
    /// Directory of secret extra headers (each file is one `Name: value` line).
    #[arg(long = "extra-headers-dir", default_value = "/extraheaders")]
    pub extra_headers_dir: PathBuf,
    /// The proxy settings (flags, or the usual environment variables).
    #[command(flatten)]
    pub proxy: ProxyArgs,
    /// Resume attempts after a dropped connection before giving up.
    #[arg(long, default_value_t = 8)]
    pub retries: u32,
    /// Refuse HTTP redirects to link-local (169.254.0.0/16, fe80::/10: cloud metadata),
    /// loopback and unspecified addresses. CDI follows them; the deploy manifests set it.
    #[arg(
        long = "refuse-internal-redirects",
        env = "FERRYDISK_REFUSE_INTERNAL_REDIRECTS",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub refuse_internal_redirects: bool,
    /// Give up on a request that gets no answer, or a transfer that delivers no byte, for
    /// this many seconds (CDI: 600); token endpoints included.
    #[arg(long = "idle-timeout", value_name = "SECONDS", default_value_t = 600)]
    pub idle_timeout: u64,

    // ---- how to write ----
    /// Allocate the whole destination (Go ParseBool syntax; an invalid value is an error, as in CDI).
    #[arg(long, env = "PREALLOCATION")]
    pub preallocation: Option<String>,

    // ---- node pull handshake ----
    /// `pod` or `node`.
    #[arg(
        long = "pull-method",
        env = "IMPORTER_PULL_METHOD",
        default_value = "pod"
    )]
    pub pull_method: String,
    /// Wait for this file before importing; its content names the disk file (node pull).
    #[arg(long = "ready-file", env = "IMPORTER_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Create this file after a successful import (node pull).
    #[arg(long = "done-file", env = "IMPORTER_DONE_FILE")]
    pub done_file: Option<PathBuf>,
    /// How long to wait for --ready-file, in seconds (CDI: a fixed 60).
    #[arg(long = "ready-timeout", value_name = "SECONDS", default_value_t = 3600)]
    pub ready_timeout: u64,

    // ---- fixed paths ----
    /// Destination disk [default: --block-device if it exists, else <data-dir>/disk.img].
    #[arg(long)]
    pub dest: Option<PathBuf>,
    /// HTTPS address of the progress metric; `none` to disable.
    #[arg(long = "metrics-addr", default_value = "0.0.0.0:8443")]
    pub metrics_addr: String,
    /// UID used as the ownerUID label of the progress metric.
    #[arg(long = "owner-uid", env = "OWNER_UID", default_value = "")]
    pub owner_uid: String,

    /// The registry layer whose blob is the disk (`sha256:...`), for an OCI artifact with
    /// several (CDI's VEP 395 import by digest). Default: KubeVirt's disk media type, or
    /// an artifact's only non-tar layer, else the containerDisk's `disk/` file.
    #[arg(long = "layer-digest", env = "FERRYDISK_LAYER_DIGEST")]
    pub layer_digest: Option<String>,
    /// Selects the disk layer of a KubeVirt VM artifact by its annotations, all of which
    /// must match (CDI's VEP 395 `matchAnnotations`), e.g. `io.kubevirt.disk.name=rootdisk`;
    /// repeatable. The env var takes `KEY=VALUE[,KEY=VALUE...]`.
    #[arg(
        long = "layer-annotation",
        env = "FERRYDISK_LAYER_ANNOTATIONS",
        value_name = "KEY=VALUE",
        value_delimiter = ','
    )]
    pub layer_annotations: Vec<String>,

    /// containers-registries.conf(5) file with registry mirrors for pulls (air-gapped
    /// clusters): mirrors tried in order, then the registry; `blocked` refused. Default:
    /// /etc/containers/registries.conf when it exists.
    #[arg(
        long = "registries-conf",
        env = "CONTAINERS_REGISTRIES_CONF",
        value_name = "FILE"
    )]
    pub registries_conf: Option<PathBuf>,
    /// Architecture to select from an image index (registry source).
    #[arg(long = "registry-arch", env = "IMPORTER_REGISTRY_IMAGE_ARCHITECTURE")]
    pub registry_arch: Option<String>,

    // ---- imageio (oVirt/OLVM, Forklift's warm migrations) ----
    /// The oVirt disk to import (`IMPORTER_SOURCE=imageio`).
    #[arg(long = "disk-id", env = "IMPORTER_DISK_ID")]
    pub disk_id: Option<String>,
    /// The snapshot (or the disk's image id) this stage copies.
    #[arg(long = "current-checkpoint", env = "IMPORTER_CURRENT_CHECKPOINT")]
    pub current_checkpoint: Option<String>,
    /// The snapshot the previous stage copied: this stage is a delta applied onto it.
    #[arg(long = "previous-checkpoint", env = "IMPORTER_PREVIOUS_CHECKPOINT")]
    pub previous_checkpoint: Option<String>,
    /// The last stage of a multi-stage import (`true`/`false`).
    #[arg(long = "final-checkpoint", env = "IMPORTER_FINAL_CHECKPOINT")]
    pub final_checkpoint: Option<String>,
    /// How long an image transfer may stay `initializing` before the import gives up
    /// (and cancels it), in seconds.
    #[arg(
        long = "imageio-transfer-timeout",
        value_name = "SECONDS",
        default_value_t = 300
    )]
    pub imageio_transfer_timeout: u64,
    /// Seconds between tries while the engine says the disk is locked (CDI: 15).
    #[arg(
        long = "imageio-lock-wait",
        value_name = "SECONDS",
        default_value_t = 15,
        hide = true
    )]
    pub imageio_lock_wait: u64,

    // ---- accepted for contract compatibility; used by the vddk source, which needs
    // VMware's proprietary library ----
    #[arg(long, env = "IMPORTER_UUID", hide = true)]
    pub uuid: Option<String>,
    #[arg(long, env = "IMPORTER_BACKING_FILE", hide = true)]
    pub backing_file: Option<String>,
    #[arg(long, env = "IMPORTER_THUMBPRINT", hide = true)]
    pub thumbprint: Option<String>,
}

impl ImportArgs {
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        match self.metrics_addr.as_str() {
            "" | "none" | "off" => None,
            a => a.parse().ok(),
        }
    }
}

/// `importer inspect SOURCE`: the import pipeline run into a writer that keeps nothing.
#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// `https://...`, `file:///path` or a path, `docker://host/repo:tag`, `oci:DIR[:TAG]`,
    /// `oci-archive:FILE`, `docker-archive:FILE`.
    pub image: String,
    /// `json` (one object on stdout) or `table`.
    #[arg(long = "output", short = 'o', value_enum, default_value = "json")]
    pub output: InspectOutput,
    /// Credentials, CA directories, proxies, platform: as for an import.
    #[command(flatten)]
    pub import: ImportArgs,
}
