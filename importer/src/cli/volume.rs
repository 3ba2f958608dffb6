//! Where the disk goes and how it is written (shared by `import` and `upload-server`),
//! and the proxy settings every client role takes.

use clap::Args;
use std::path::PathBuf;

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
