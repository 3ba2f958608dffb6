//! `ferrydisk upload FILE --url https://proxy --token T`: a disk image through CDI's
//! upload proxy, resumable (tus, [`tus`]) when the proxy offers it, else CDI's one-shot
//! upload ([`oneshot`]); the file's sha256 computed while it is sent ([`digest`]) and
//! checked by the server; progress for a person ([`meter`]).

mod digest;
mod meter;
mod oneshot;
mod tus;

use crate::cli::UploaderArgs;
use crate::config::uploader::{Target, UploaderConfig};
use ferrydisk_common::cdi::upload::RESUMABLE;
use meter::{human, Meter};
use std::sync::atomic::Ordering::Relaxed;

/// Why an upload did not complete.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The server answered the creation URL with 404/405: no resumable uploads there.
    #[error("the server does not offer resumable uploads")]
    NotOffered,
    /// The server refused the upload; its words.
    #[error("the server answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("{0}")]
    File(String),
    #[error("gave up after {attempts} attempts in a row that moved nothing: {last}")]
    GaveUp { attempts: u32, last: String },
    #[error("{0}")]
    Client(String),
}

/// How an upload went, for the last line.
pub struct Summary {
    pub protocol: &'static str,
    pub verified: bool,
}

pub async fn run(args: UploaderArgs) -> i32 {
    let config = match UploaderConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot upload");
            eprintln!("ferrydisk upload: {e}");
            return 2;
        }
    };
    let name = config
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let len = match std::fs::metadata(&config.file) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => return fail(&format!("{} is not a file", config.file.display())),
        Err(e) => return fail(&format!("{}: {e}", config.file.display())),
    };
    let meter = Meter::new(name.clone(), len, config.bar);
    let display = meter.spawn();
    let result = upload(&config, len, &meter).await;
    display.abort();
    meter.close();
    match result {
        Ok(s) => {
            let secs = meter.elapsed().as_secs_f64();
            let resumes = meter.resumes.load(Relaxed);
            if !config.bar {
                tracing::info!(file = %name, bytes = len, seconds = format!("{secs:.1}"), protocol = s.protocol, resumes, verified = s.verified, "upload complete");
            } else {
                eprintln!(
                    "uploaded {name}: {} in {secs:.1} s ({:.1} MB/s){}{}",
                    human(len),
                    len as f64 / secs.max(0.001) / 1e6,
                    match resumes {
                        0 => String::new(),
                        n => format!(", resumed {n} times"),
                    },
                    if s.verified {
                        ", sha256 verified by the server"
                    } else {
                        ""
                    }
                );
            }
            0
        }
        Err(e) => fail(&e.to_string()),
    }
}

fn fail(message: &str) -> i32 {
    tracing::error!(error = %message, "upload failed");
    eprintln!("ferrydisk upload: {message}");
    1
}

async fn upload(c: &UploaderConfig, len: u64, meter: &Meter) -> Result<Summary, UploadError> {
    let client = client(c)?;
    match &c.target {
        Target::Auto { base } => {
            match tus::upload(&client, &format!("{base}{RESUMABLE}"), c, len, meter).await {
                Err(UploadError::NotOffered) => {
                    tracing::info!("the proxy offers no resumable uploads; uploading in one request as CDI does");
                    oneshot::upload(&client, &format!("{base}/v1beta1/upload"), c, len, meter).await
                }
                other => other,
            }
        }
        Target::Resumable { create } => tus::upload(&client, create, c, len, meter).await,
        Target::OneShot { url } => oneshot::upload(&client, url, c, len, meter).await,
    }
}

fn client(c: &UploaderConfig) -> Result<reqwest::Client, UploadError> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .user_agent(concat!("ferrydisk-upload/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(std::time::Duration::from_secs(30))
        .tcp_keepalive(std::time::Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .danger_accept_invalid_certs(c.insecure);
    if let Some(pem) = &c.cacert {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| UploadError::Client(format!("--cacert: {e}")))?;
        if certs.is_empty() {
            return Err(UploadError::Client("--cacert holds no certificate".into()));
        }
        for cert in certs {
            b = b.add_root_certificate(cert);
        }
    }
    b.build()
        .map_err(|e| UploadError::Client(ferrydisk_common::error::chain_line(&e)))
}

/// The server's words in an answer: its text, on one line, bounded.
async fn answer_text(r: reqwest::Response) -> String {
    let status = r.status();
    let mut body = Vec::new();
    let mut r = r;
    while let Ok(Some(chunk)) = r.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() > 4096 {
            body.truncate(4096);
            break;
        }
    }
    let text = String::from_utf8_lossy(&body).trim().replace('\n', " ");
    if text.is_empty() {
        status.canonical_reason().unwrap_or("").to_string()
    } else {
        text
    }
}

/// Waits before attempt `n` of a row: 0.25 s after one failure (a drop, usually: the
/// network is back at once), then 1, 2, 4 ... 30 s.
async fn backoff(n: u32) {
    let ms = match n {
        0 | 1 => 250,
        n => 1000u64 << (n - 2).min(5),
    };
    tokio::time::sleep(std::time::Duration::from_millis(ms.min(30_000))).await;
}
