//! `push`: what goes up, where, and how (the options shared with `upload-server
//! --push-dest`).

use super::ProxyArgs;
use clap::Args;
use std::path::PathBuf;

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
