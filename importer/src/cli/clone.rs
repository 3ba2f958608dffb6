//! The helper roles CDI's controller starts: the clone source and its entrypoint, the
//! node-pull disk server, size detection and the DataImportCron poller.

use super::ProxyArgs;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;

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
