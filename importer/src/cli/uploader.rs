//! `ferrydisk upload`: a person's upload client (resumable through the proxy).

use clap::Args;
use std::path::PathBuf;

/// `ferrydisk upload FILE --url URL --token TOKEN`.
#[derive(Args, Debug, Clone)]
pub struct UploaderArgs {
    /// Log verbosity, klog style: 0-2 info, 3+ debug.
    #[arg(short = 'v', long = "v", value_name = "LEVEL", default_value_t = 0)]
    pub verbosity: u8,
    /// The disk image to upload (any format the upload server takes).
    pub file: PathBuf,
    /// The upload proxy: `https://HOST[:PORT]` (resumable when the proxy offers it, else
    /// CDI's one-shot upload), or a full path: `.../v1beta1/upload-resumable` (resumable
    /// only) or one of CDI's (`.../v1beta1/upload`, `-async`: one-shot).
    #[arg(long, env = "FERRYDISK_UPLOAD_URL")]
    pub url: String,
    /// The upload token (`virtctl` or the UploadTokenRequest API gives it).
    #[arg(long, env = "FERRYDISK_UPLOAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the upload token.
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust for the proxy (besides the system's).
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Do not verify the proxy's certificate.
    #[arg(long)]
    pub insecure: bool,
    /// Failed attempts in a row (no byte taken in between) before giving up.
    #[arg(long, default_value_t = 10)]
    pub retries: u32,
    /// Seconds with no byte taken by the network before an attempt counts as failed.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout: u64,
    /// Do not send the file's sha256 for the server to verify.
    #[arg(long)]
    pub no_checksum: bool,
    /// Progress as JSON log lines even on a terminal (a bar is drawn on one otherwise).
    #[arg(long)]
    pub no_progress_bar: bool,
}
