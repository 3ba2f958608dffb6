//! The `importer` command line. Every CDI env var is read through clap (`env = ...`)
//! and every fixed path has a flag, so the same binary runs unchanged in a CDI pod and
//! on a workstation.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "ferrydisk",
    version,
    propagate_version = true,
    about = "Streams VM disks from any source onto a volume or into a registry: KubeVirt CDI's data-plane roles in one binary",
    long_about = "Streams VM disks from any source onto a volume or into a registry: KubeVirt CDI's \
data-plane roles in one binary.\n\nStarted as `importer` with no subcommand (or under a CDI \
name: cdi-importer, cdi-uploadserver, cdi-cloner, ...) it runs that CDI role from its \
environment, as CDI's controller starts it. As `ferrydisk`, name the role: \
`ferrydisk import|push|inspect|upload-server|...`; `ferrydisk ROLE --help` lists its \
options and environment variables."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Import a disk onto a file or block device (CDI's importer; the default role).
    Import(Box<ImportArgs>),
    /// Take uploads and clone streams for one volume (CDI's cdi-uploadserver).
    UploadServer(Box<UploadArgs>),
    /// Serve a containerDisk's disk on loopback for pullMethod node (cdi-containerimage-server).
    ///
    /// Go-style single-dash flags are accepted, as CDI's controller passes them.
    ServeDisk(ServeArgs),
    /// Print an image's virtual size to the termination message (cdi-image-size-detection).
    ///
    /// Run by the clone controller; Go-style single-dash flags are accepted.
    SizeDetection(SizeArgs),
    /// Stream a volume to a clone target's upload server (CDI's cdi-cloner).
    ///
    /// Go-style single-dash flags are accepted.
    CloneSource(ClonerArgs),
    /// The cloner image's entrypoint (CDI's cloner_startup.sh): env VOLUME_MODE,
    /// MOUNT_POINT, PREALLOCATION, then clone-source.
    #[command(hide = true)]
    ClonerStartup(StartupArgs),
    /// Record a DataImportCron poll: the image's digest (cdi-source-update-poller).
    ///
    /// Go-style single-dash flags are accepted.
    SourceUpdatePoller(PollerArgs),
    /// Push a disk or a whole VM into a registry, a layout or an archive, streamed.
    ///
    /// As a containerDisk or as KubeVirt's VM artifact; from a file, a volume or any
    /// import source; a layer the registry has is not sent again.
    Push(Box<PushArgs>),
    /// Show what an import would find (layers, format, sizes, digests), writing nothing.
    ///
    /// As JSON or a table.
    Inspect(Box<InspectArgs>),
}

/// Subcommands the binary knows; anything else on the command line means `import`
/// (CDI starts the container with only `-v=<n>`).
pub const SUBCOMMANDS: &[&str] = &[
    "import",
    "upload-server",
    "serve-disk",
    "size-detection",
    "clone-source",
    "cloner-startup",
    "source-update-poller",
    "push",
    "inspect",
    "help",
];

/// CDI's binary names, for images that link them to this binary: the subcommand each
/// one means when the program is started under that name.
const ARGV0: &[(&str, &str)] = &[
    ("cdi-uploadserver", "upload-server"),
    ("cdi-importer", "import"),
    ("cdi-containerimage-server", "serve-disk"),
    ("cdi-image-size-detection", "size-detection"),
    ("cdi-cloner", "clone-source"),
    ("cloner_startup.sh", "cloner-startup"),
    ("cdi-source-update-poller", "source-update-poller"),
    // CDI copies the server to /shared/server and starts it under that name.
    ("server", "serve-disk"),
];

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

/// How the disk is written: raw, or a qcow2 file.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Raw,
    Qcow2,
}

/// `--direct-io`: O_DIRECT where the destination allows it, or the page cache.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectIo {
    Auto,
    Off,
}

/// `importer inspect --output`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum InspectOutput {
    Json,
    Table,
}

/// Proxies for outgoing requests: the flags, else the lower-case environment variables
/// (CDI's), else the upper-case ones.
#[derive(Args, Debug, Clone, Default)]
pub struct ProxyArgs {
    /// HTTP proxy URL (also http_proxy, HTTP_PROXY).
    #[arg(long = "http-proxy", env = "http_proxy", hide_env_values = true)]
    pub http_proxy: Option<String>,
    /// HTTPS proxy URL (also https_proxy, HTTPS_PROXY).
    #[arg(long = "https-proxy", env = "https_proxy", hide_env_values = true)]
    pub https_proxy: Option<String>,
    /// Hosts that bypass the proxy (also no_proxy, NO_PROXY).
    #[arg(long = "no-proxy", env = "no_proxy")]
    pub no_proxy: Option<String>,
    #[arg(
        long = "http-proxy-upper",
        env = "HTTP_PROXY",
        hide = true,
        hide_env_values = true
    )]
    pub http_proxy_upper: Option<String>,
    #[arg(
        long = "https-proxy-upper",
        env = "HTTPS_PROXY",
        hide = true,
        hide_env_values = true
    )]
    pub https_proxy_upper: Option<String>,
    #[arg(long = "no-proxy-upper", env = "NO_PROXY", hide = true)]
    pub no_proxy_upper: Option<String>,
}

impl ProxyArgs {
    /// The proxies in effect, empty values meaning none.
    pub fn proxies(&self) -> crate::sources::client::Proxies {
        let pick = |a: &Option<String>, b: &Option<String>| {
            a.clone().or_else(|| b.clone()).filter(|s| !s.is_empty())
        };
        crate::sources::client::Proxies {
            http: pick(&self.http_proxy, &self.http_proxy_upper),
            https: pick(&self.https_proxy, &self.https_proxy_upper),
            no_proxy: pick(&self.no_proxy, &self.no_proxy_upper),
        }
    }
}

/// Where the disk goes and how it is written: the same for `import` and `upload-server`.
#[derive(Args, Debug, Clone)]
pub struct VolumeArgs {
    /// Log verbosity, klog style (CDI passes `-v=<n>`): 0-2 info, 3+ debug.
    #[arg(short = 'v', long = "v", value_name = "LEVEL", default_value_t = 0)]
    pub verbosity: u8,
    /// Fraction of a filesystem volume reserved for filesystem overhead (e.g. 0.06).
    #[arg(
        long = "filesystem-overhead",
        env = "FILESYSTEM_OVERHEAD",
        default_value = "0"
    )]
    pub filesystem_overhead: String,
    /// `TRYNONE`: bypass the page cache with O_DIRECT where the destination allows it.
    /// Unset: as `--direct-io` says. Any other value: buffered writes (CDI's writeback).
    #[arg(long = "cache-mode", env = "CACHE_MODE", default_value = "")]
    pub cache_mode: String,
    /// With `CACHE_MODE` unset: `auto` writes aligned blocks with O_DIRECT where the
    /// destination allows it (no page cache charged to the pod, less CPU per byte);
    /// `off` writes through the page cache with write-behind checkpoints, as CDI does.
    #[arg(
        long = "direct-io",
        env = "FERRYDISK_DIRECT_IO",
        value_enum,
        default_value = "auto"
    )]
    pub direct_io: DirectIo,
    /// The block volume whose existence selects block mode.
    #[arg(long = "block-device", default_value = "/dev/cdi-block-volume")]
    pub block_device: PathBuf,
    /// The filesystem volume (archive content is unpacked here).
    #[arg(long = "data-dir", default_value = "/data")]
    pub data_dir: PathBuf,
    /// Scratch volume, used only by a qcow2 whose data precedes its tables.
    #[arg(long, default_value = "/scratch")]
    pub scratch: PathBuf,
    /// Where the result for the controller goes.
    #[arg(long = "termination-log", default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
    /// `qcow2`: the disk is written as qcow2 instead of raw. A qcow2 image is kept as it
    /// came (after the same validation as a conversion); any other format goes through
    /// the streaming qcow2 writer. Only for a file destination.
    #[arg(
        long = "output-format",
        env = "FERRYDISK_OUTPUT_FORMAT",
        value_enum,
        default_value = "raw"
    )]
    pub output_format: OutputFormat,
    /// With `--output-format qcow2`: data clusters deflate-compressed, as `qemu-img
    /// convert -c` writes them (a qcow2 source kept as it came is not recompressed).
    #[arg(long = "qcow2-compress", env = "FERRYDISK_QCOW2_COMPRESS")]
    pub qcow2_compress: bool,
    /// A block volume known to read as zeros already (a freshly provisioned thin volume
    /// or a device discarded beforehand): zero runs are skipped instead of deallocated
    /// or zeroed. Holes show whatever the device held if this is not true. Ignored with
    /// `PREALLOCATION=true`.
    #[arg(long = "target-zeroed", env = "FERRYDISK_TARGET_ZEROED")]
    pub target_zeroed: bool,
    /// How long clients of the upload server and the metric endpoint may take.
    #[command(flatten)]
    pub timeouts: ferrydisk_common::serve::listen::TimeoutArgs,
}

impl VolumeArgs {
    /// Whether to try O_DIRECT: CDI's `CACHE_MODE=TRYNONE` always; with `CACHE_MODE`
    /// unset, ferrydisk's default (`--direct-io auto`); any other `CACHE_MODE` is CDI's
    /// writeback.
    pub fn direct(&self) -> bool {
        match self.cache_mode.as_str() {
            "TRYNONE" => true,
            "" => self.direct_io == DirectIo::Auto,
            _ => false,
        }
    }
}

/// `importer upload-server`: CDI's cdi-uploadserver env contract (section 4).
#[derive(Args, Debug, Clone)]
pub struct UploadArgs {
    /// Where the disk goes and how it is written (shared with the other subcommands).
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// Server private key (PEM).
    #[arg(
        long = "tls-key",
        env = "TLS_KEY_FILE",
        default_value = "/etc/tls/tls.key"
    )]
    pub tls_key: PathBuf,
    /// Server certificate (PEM).
    #[arg(
        long = "tls-cert",
        env = "TLS_CERT_FILE",
        default_value = "/etc/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// CA bundle that signs client certificates (the upload proxy's).
    #[arg(
        long = "client-ca",
        env = "CLIENT_CERT_FILE",
        default_value = "/etc/tls/ca.crt"
    )]
    pub client_ca: PathBuf,
    /// Required client certificate common name.
    #[arg(
        long = "client-name",
        env = "CLIENT_NAME",
        default_value = "client.upload-server.cdi.kubevirt.io"
    )]
    pub client_name: String,
    /// Accept uploads without a client certificate (for use outside a cluster only).
    #[arg(long = "no-client-auth")]
    pub no_client_auth: bool,
    /// Requested size as a Kubernetes quantity (the PVC request).
    #[arg(long = "image-size", env = "UPLOAD_IMAGE_SIZE", default_value = "")]
    pub image_size: String,
    /// Allocate the whole disk (lenient here, as in CDI: invalid means false).
    #[arg(long, env = "PREALLOCATION", default_value = "false")]
    pub preallocation: String,
    /// RFC 3339 time after which an idle server exits with `deadlinePassed`.
    #[arg(long, env = "DEADLINE")]
    pub deadline: Option<String>,
    /// Disk destination [default: /dev/cdi-block-volume if it exists, else <data-dir>/disk.img].
    #[arg(long, env = "DESTINATION")]
    pub dest: Option<PathBuf>,
    #[arg(long = "listen", env = "LISTEN_ADDRESS", default_value = "0.0.0.0")]
    pub listen_address: String,
    /// Port (invalid means 8443, as in CDI).
    #[arg(long = "port", env = "LISTEN_PORT", default_value = "8443")]
    pub listen_port: String,
    /// `VersionTLS12` or `VersionTLS13`.
    #[arg(long = "tls-min-version", env = "TLS_MIN_VERSION", default_value = "")]
    pub tls_min_version: String,
    /// Accepted for compatibility; rustls offers only modern AEAD suites.
    #[arg(long = "tls-ciphers", env = "TLS_CIPHERS", default_value = "")]
    pub tls_ciphers: String,
    /// The `ownerUID` label of `/metrics` (CDI's upload pod sets none; blank then).
    #[arg(long = "owner-uid", env = "OWNER_UID", default_value = "")]
    pub owner_uid: String,
    /// After the upload is complete, push the disk to this registry reference (or
    /// local layout/archive) as `importer push` would, taking its other settings from
    /// the FERRYDISK_PUSH_* and credential environment (Deckhouse's uploader into DVCR).
    #[arg(long = "push-dest", env = "FERRYDISK_PUSH_DEST")]
    pub push_dest: Option<String>,
    /// How `--push-dest` pushes (the volume goes up as it was written: `--convert` is
    /// `keep` whatever it says).
    #[command(flatten, next_help_heading = "Push after the upload (--push-dest)")]
    pub push: PushOptions,
}

/// `importer serve-disk`: CDI's containerimage-server flags (section 3).
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Port on localhost (Go flag `-p`).
    #[arg(short = 'p', long = "p", default_value_t = 8100)]
    pub port: u16,
    /// Directory holding the one disk file.
    #[arg(long = "image-dir", default_value = ".")]
    pub image_dir: PathBuf,
    /// Written (with the disk file's name) once the server listens.
    #[arg(long = "ready-file", default_value = "/shared/ready")]
    pub ready_file: PathBuf,
    /// The importer creates it when done; the server then exits.
    #[arg(long = "done-file", default_value = "/shared/done")]
    pub done_file: PathBuf,
    /// The container's root, checked for bootc/ostree images.
    #[arg(long = "root", default_value = "/", hide = true)]
    pub root: PathBuf,
}

/// `importer clone-source`: CDI's cdi-cloner flags; the rest is env (`OWNER_UID`,
/// `CLIENT_KEY`, `CLIENT_CERT`, `SERVER_CA_CERT`, `UPLOAD_URL`, `PREALLOCATION`), read
/// as CDI reads it.
#[derive(Args, Debug, Clone)]
pub struct ClonerArgs {
    /// klog verbosity.
    #[arg(short = 'v', long = "v", value_name = "LEVEL", default_value_t = 0)]
    pub verbosity: u8,
    /// `filesystem-clone` or `blockdevice-clone`.
    #[arg(long = "content-type", default_value = "")]
    pub content_type: String,
    /// The source volume: its mount point, or the block device.
    #[arg(long = "mount", default_value = "")]
    pub mount: PathBuf,
    /// About how many bytes will be read (the progress metric's 100 %).
    #[arg(long = "upload-bytes", default_value_t = 0)]
    pub upload_bytes: u64,
    /// Where the result goes.
    #[arg(long = "termination-log", default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
    /// HTTPS address of the clone progress metric; `none` to disable.
    #[arg(long = "metrics-addr", default_value = "0.0.0.0:8443")]
    pub metrics_addr: String,
    /// CDI's cloner environment, read here and nowhere else.
    #[command(flatten)]
    pub env: ClonerEnv,
    /// How long clients of the metric endpoint may take.
    #[command(flatten)]
    pub timeouts: ferrydisk_common::serve::listen::TimeoutArgs,
}

/// The environment CDI's controller gives the clone source pod; a missing one fails
/// the clone ("Error getting env var NAME"), as in CDI.
#[derive(Args, Debug, Clone, Default)]
pub struct ClonerEnv {
    #[arg(long = "owner-uid", env = "OWNER_UID", hide = true)]
    pub owner_uid: Option<String>,
    #[arg(
        long = "client-key",
        env = "CLIENT_KEY",
        hide = true,
        hide_env_values = true
    )]
    pub client_key: Option<String>,
    #[arg(long = "client-cert", env = "CLIENT_CERT", hide = true)]
    pub client_cert: Option<String>,
    #[arg(long = "server-ca-cert", env = "SERVER_CA_CERT", hide = true)]
    pub server_ca_cert: Option<String>,
    #[arg(long = "upload-url", env = "UPLOAD_URL", hide = true)]
    pub upload_url: Option<String>,
    #[arg(long = "preallocation", env = "PREALLOCATION", hide = true)]
    pub preallocation: Option<String>,
}

/// `cloner_startup.sh`'s environment, from the cloner pod's spec.
#[derive(Args, Debug, Clone)]
pub struct StartupArgs {
    /// `block` or `filesystem`.
    #[arg(long = "volume-mode", env = "VOLUME_MODE", default_value = "")]
    pub volume_mode: String,
    /// The source volume's mount point or device.
    #[arg(long = "mount-point", env = "MOUNT_POINT", default_value = "")]
    pub mount_point: String,
    /// The cloner's environment, passed on to the clone.
    #[command(flatten)]
    pub env: ClonerEnv,
    /// How long clients of the metric endpoint may take.
    #[command(flatten)]
    pub timeouts: ferrydisk_common::serve::listen::TimeoutArgs,
}

impl ClonerArgs {
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        match self.metrics_addr.as_str() {
            "" | "none" | "off" => None,
            a => a.parse().ok(),
        }
    }
}

/// `importer source-update-poller`: CDI's cdi-source-update-poller flags; registry
/// credentials from `IMPORTER_ACCESS_KEY_ID`/`IMPORTER_SECRET_KEY`, `INSECURE_TLS`.
#[derive(Args, Debug, Clone)]
pub struct PollerArgs {
    /// A kubeconfig (else in-cluster config).
    #[arg(long = "kubeconfig", env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The API server URL, overriding the config's.
    #[arg(long = "server", default_value = "")]
    pub server: String,
    /// The DataImportCron's namespace.
    #[arg(long = "ns", default_value = "")]
    pub ns: String,
    /// The DataImportCron's name.
    #[arg(long = "cron", default_value = "")]
    pub cron: String,
    /// The image it follows (`docker://registry/repo:tag`).
    #[arg(long = "url", default_value = "")]
    pub url: String,
    /// Registry CA certificates.
    #[arg(long = "certdir")]
    pub certdir: Option<PathBuf>,
    /// Registry username.
    #[arg(
        long = "access-key-id",
        env = "IMPORTER_ACCESS_KEY_ID",
        hide = true,
        hide_env_values = true
    )]
    pub access_key_id: Option<String>,
    /// Registry password.
    #[arg(
        long = "secret-key",
        env = "IMPORTER_SECRET_KEY",
        hide = true,
        hide_env_values = true
    )]
    pub secret_key: Option<String>,
    /// Skip TLS verification (Go ParseBool syntax; invalid means false).
    #[arg(
        long = "insecure-tls",
        env = "INSECURE_TLS",
        default_value = "false",
        hide = true
    )]
    pub insecure_tls: String,
    /// Registry mirrors (containers-registries.conf(5)).
    #[arg(
        long = "registries-conf",
        env = "CONTAINERS_REGISTRIES_CONF",
        hide = true
    )]
    pub registries_conf: Option<PathBuf>,
    /// The proxy settings (flags, or the usual environment variables).
    #[command(flatten)]
    pub proxy: ProxyArgs,
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

/// `importer push`: a disk file, volume or any import source into a registry.
#[derive(Args, Debug, Clone)]
pub struct PushArgs {
    /// Log verbosity, klog style: 0-2 info, 3+ debug.
    #[arg(short = 'v', long = "v", value_name = "LEVEL", default_value_t = 0)]
    pub verbosity: u8,
    /// The disk: a file (holes are not read) or a block device; or anything an import
    /// reads (`https://...`, `docker://...`, `oci:DIR`, `oci-archive:FILE`,
    /// `docker-archive:FILE`), imported into --spool-dir first.
    #[arg(
        long,
        env = "FERRYDISK_PUSH_SOURCE",
        default_value = "",
        value_parser = clap::builder::TypedValueParser::map(clap::builder::OsStringValueParser::new(), PathBuf::from)
    )]
    pub source: PathBuf,
    /// One disk of a whole VM artifact, `NAME=SOURCE` (the volume name, any --source
    /// form); repeated, one layer each, in one manifest (with --vm for the VM object).
    #[arg(long = "disk", value_name = "NAME=SOURCE")]
    pub disks: Vec<String>,
    /// `docker://host[:port]/repo[:tag]`, or saved locally: `oci:DIR[:TAG]`,
    /// `oci-archive:FILE[:TAG]`, `docker-archive:FILE[:NAME:TAG]`.
    #[arg(long, env = "FERRYDISK_PUSH_DEST")]
    pub dest: String,
    /// How the payload is made and sent (shared with `upload-server --push-dest`).
    #[command(flatten)]
    pub options: PushOptions,
}

/// `--convert`: the payload as stored, or converted.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convert {
    Keep,
    Raw,
    Qcow2,
}

/// The push settings other than what and where: the same for `push` and for the
/// upload server's `--push-dest`.
#[derive(Args, Debug, Clone)]
pub struct PushOptions {
    /// The payload: `keep` (a local file as stored; an imported source as qcow2, a
    /// qcow2 source's bytes unchanged), `raw` or `qcow2` (converted, via the spool).
    #[arg(
        long,
        env = "FERRYDISK_PUSH_CONVERT",
        value_enum,
        default_value = "keep"
    )]
    pub convert: Convert,
    /// Where an imported or converted source is spooled (default: the temp dir).
    #[arg(long = "spool-dir", env = "FERRYDISK_PUSH_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// The largest disk a streamed push may send (an artifact imported as raw goes up
    /// as it is decoded, with no volume to cap it).
    #[arg(
        long = "max-size",
        env = "FERRYDISK_PUSH_MAX_SIZE",
        default_value = "1Ti"
    )]
    pub max_size: String,
    /// `containerdisk` (a tar layer holding disk/<name>) or `artifact` (the disk as the
    /// layer blob, KubeVirt's disk media type).
    #[arg(
        long,
        env = "FERRYDISK_PUSH_LAYOUT",
        value_enum,
        default_value = "containerdisk"
    )]
    pub layout: crate::push::layer::Layout,
    /// The disk's file name under disk/ (containerdisk) or its title (artifact).
    #[arg(
        long = "disk-name",
        env = "FERRYDISK_PUSH_DISK_NAME",
        default_value = "disk.img"
    )]
    pub disk_name: String,
    /// The VM volume an artifact's disk belongs to (`io.kubevirt.disk.name`, the layer
    /// title `<name>.raw.zst`); a DNS-1123 label.
    #[arg(
        long = "volume-name",
        env = "FERRYDISK_PUSH_VOLUME_NAME",
        default_value = "rootdisk"
    )]
    pub volume_name: String,
    /// The VirtualMachine (JSON) an artifact's config carries, its cluster-specific
    /// fields removed and DataVolume volumes turned into PVC volumes; without it, a
    /// minimal VM booting the one disk.
    #[arg(long = "vm", value_name = "FILE")]
    pub vm: Option<PathBuf>,
    /// Compress the layer with zstd (multi-threaded on the cores available).
    #[arg(long, env = "FERRYDISK_PUSH_ZSTD")]
    pub zstd: bool,
    /// zstd level (1-19).
    #[arg(long = "zstd-level", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub zstd_level: i32,
    /// Upload in PATCHes of this many MiB, each with its Content-Range (the spec's
    /// chunked upload), instead of one streamed PATCH. At least 5 (S3-backed registries).
    #[arg(long = "chunk-mib", value_parser = clap::value_parser!(u64).range(5..=1024))]
    pub chunk_mib: Option<u64>,
    /// The image config's architecture (containerdisk), `arch[/variant]`. Several,
    /// comma-separated (`amd64,arm64/v8`), push an image index with one manifest per
    /// platform, all sharing the one layer.
    #[arg(long, default_value = "amd64")]
    pub arch: String,
    /// `KEY=VALUE` in the image config's Env (containerdisk), repeatable: keys holding
    /// `KUBEVIRT_IO_` become PVC labels when CDI imports the image.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Ask the registry to mount the layer from this repository of the same registry
    /// (cross-repository mount) before uploading it.
    #[arg(long = "mount-from", value_name = "REPO")]
    pub mount_from: Option<String>,
    /// Registry username (as for imports).
    #[arg(
        long = "access-key-id",
        env = "IMPORTER_ACCESS_KEY_ID",
        hide_env_values = true
    )]
    pub access_key_id: Option<String>,
    /// Registry password.
    #[arg(
        long = "secret-key",
        env = "IMPORTER_SECRET_KEY",
        hide_env_values = true
    )]
    pub secret_key: Option<String>,
    /// Credentials file (docker `config.json` / containers `auth.json`).
    #[arg(long = "auth-file", env = "REGISTRY_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// Directory of extra CA certificates (PEM).
    #[arg(long = "cert-dir", env = "IMPORTER_CERT_DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Skip TLS verification, and fall back to plain HTTP (Go ParseBool syntax).
    #[arg(long = "insecure-tls", env = "INSECURE_TLS", default_value = "false")]
    pub insecure_tls: String,
    /// Resumptions of a cut blob upload in a row without progress before the push fails
    /// (each asks the registry where the session stands and continues from there).
    #[arg(long, env = "FERRYDISK_PUSH_RETRIES", default_value_t = 5)]
    pub retries: u32,
    /// Seconds the registry may take to answer a request, or to take more of an upload
    /// while data is waiting, before the push fails.
    #[arg(
        long = "idle-timeout",
        env = "FERRYDISK_PUSH_IDLE_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 300
    )]
    pub idle_timeout: u64,
    /// A registry source's platform, picked from its index (default: this machine's).
    #[arg(long = "source-arch", env = "IMPORTER_REGISTRY_IMAGE_ARCHITECTURE")]
    pub source_arch: Option<String>,
    /// containers-registries.conf(5) with mirrors for a registry source.
    #[arg(
        long = "registries-conf",
        env = "CONTAINERS_REGISTRIES_CONF",
        value_name = "FILE"
    )]
    pub registries_conf: Option<PathBuf>,
    /// The proxy settings (flags, or the usual environment variables).
    #[command(flatten)]
    pub proxy: ProxyArgs,
    /// Seconds since 1970 for an artifact index's `created` annotation, so that a build
    /// can be reproduced (default: now).
    #[arg(
        long = "created",
        env = "SOURCE_DATE_EPOCH",
        value_name = "EPOCH_SECONDS"
    )]
    pub created: Option<u64>,
}

/// `importer size-detection`: CDI's cdi-image-size-detection flags.
#[derive(Args, Debug, Clone)]
pub struct SizeArgs {
    /// The image (CDI: `-image-path /data/disk.img`). Missing: exit 1, as CDI.
    #[arg(long = "image-path", default_value = "")]
    pub image_path: String,
    /// Prefixed to the path to make the image's URL; only `file://` images are sized.
    #[arg(long = "scheme", default_value = "file://")]
    pub scheme: String,
    /// Where the virtual size goes (CDI: /dev/termination-log).
    #[arg(long = "termination-log", default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
}

/// Go's `strconv.ParseBool`: the exact spellings CDI accepts.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Inserts the default `import` subcommand when none is given.
pub fn with_default_subcommand(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let argv0 = args
        .first()
        .map(|a| {
            std::path::Path::new(a)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    if let Some((_, sub)) = ARGV0.iter().find(|(name, _)| *name == argv0) {
        args.insert(1.min(args.len()), (*sub).into());
    }
    // `ferrydisk` is for people at a terminal: a role is named, and alone it shows help.
    if argv0 == "ferrydisk" {
        if args.len() < 2 {
            args.push("--help".into());
        }
        return match args.get(1).and_then(|a| a.to_str()) {
            Some("serve-disk" | "size-detection" | "clone-source" | "source-update-poller") => {
                go_flags(args)
            }
            _ => args,
        };
    }
    if matches!(
        args.get(1).and_then(|a| a.to_str()),
        Some("serve-disk" | "size-detection" | "clone-source" | "source-update-poller")
    ) {
        return go_flags(args);
    }
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    // `importer --help` lists every role, one line each (`importer import --help` has
    // the import options and their env names); anything else with no role named is an
    // import, as CDI's controller runs it.
    let is_top =
        SUBCOMMANDS.contains(&first) || matches!(first, "-V" | "--version" | "-h" | "--help");
    if !is_top {
        args.insert(1.min(args.len()), "import".into());
    }
    args
}

/// Go's flag package takes `-image-dir x` and `-image-dir=x`: single-dash long flags
/// become clap's double-dash ones (CDI starts the server that way).
fn go_flags(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .map(|a| match a.to_str() {
            Some(s)
                if s.len() > 2
                    && s.starts_with('-')
                    && !s.starts_with("--")
                    && s.as_bytes()[1].is_ascii_alphabetic()
                    && !s.starts_with("-p=") =>
            {
                format!("-{s}").into()
            }
            _ => a,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> ImportArgs {
        let argv = with_default_subcommand(args.iter().map(Into::into).collect());
        match Cli::try_parse_from(argv).expect("parse").command {
            Command::Import(a) => *a,
            _ => panic!("not an import"),
        }
    }

    #[test]
    fn klog_verbosity_and_default_subcommand() {
        assert_eq!(parse(&["importer", "-v=3"]).volume.verbosity, 3);
        assert_eq!(parse(&["importer"]).source, "http");
        assert_eq!(
            parse(&["importer", "import", "--endpoint", "http://x/"]).endpoint,
            "http://x/"
        );
    }

    #[test]
    fn cdi_server_command_line() {
        let argv = with_default_subcommand(
            [
                "/shared/server",
                "-p",
                "8100",
                "-image-dir",
                "/disk",
                "-ready-file=/shared/ready",
                "-done-file",
                "/shared/done",
            ]
            .iter()
            .map(Into::into)
            .collect(),
        );
        match Cli::try_parse_from(argv).expect("parse").command {
            Command::ServeDisk(a) => {
                assert_eq!(a.port, 8100);
                assert_eq!(a.image_dir, std::path::PathBuf::from("/disk"));
                assert_eq!(a.ready_file, std::path::PathBuf::from("/shared/ready"));
            }
            _ => panic!("serve-disk expected"),
        }
    }

    #[test]
    fn go_bools() {
        assert_eq!(parse_go_bool("True"), Some(true));
        assert_eq!(parse_go_bool("0"), Some(false));
        assert_eq!(parse_go_bool(""), None);
        assert_eq!(parse_go_bool("yes"), None);
    }
}
