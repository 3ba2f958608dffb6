//! `upload-server`: CDI's cdi-uploadserver environment.

use super::{PushOptions, VolumeArgs};
use clap::Args;
use std::path::PathBuf;

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
