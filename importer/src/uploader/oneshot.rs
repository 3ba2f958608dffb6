//! CDI's one-shot upload: the whole file in one POST, for a proxy that offers nothing
//! else. A drop starts it again from byte 0 (no server of that kind can do better).

use super::meter::Meter;
use super::{answer_text, backoff, Summary, UploadError};
use crate::config::UploaderConfig;
use std::sync::Arc;

pub async fn upload(
    client: &reqwest::Client,
    url: &str,
    c: &UploaderConfig,
    len: u64,
    meter: &Meter,
) -> Result<Summary, UploadError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        meter.set(0);
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let body = super::tus::file_body(&c.file, 0, len, sent.clone(), None)
            .map_err(|e| UploadError::File(format!("{}: {e}", c.file.display())))?;
        let request = client
            .post(url)
            .bearer_auth(&c.token)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body)
            .send();
        let watch = super::tus::progress_watch(&sent, 0, len, meter, c.idle);
        let result = tokio::select! {
            r = request => r.map_err(|e| ferrydisk_common::error::chain_line(&e)),
            why = watch => Err(why),
        };
        let why = match result {
            Ok(r) if r.status().is_success() => {
                meter.set(len);
                return Ok(Summary {
                    protocol: "one-shot",
                    verified: false,
                });
            }
            Ok(r) if r.status().is_server_error() => {
                format!("{}: {}", r.status().as_u16(), answer_text(r).await)
            }
            Ok(r) => {
                return Err(UploadError::Refused {
                    status: r.status().as_u16(),
                    message: answer_text(r).await,
                })
            }
            Err(e) => e,
        };
        if attempt > c.retries {
            return Err(UploadError::GaveUp {
                attempts: attempt,
                last: why,
            });
        }
        tracing::warn!(error = %why, attempt, "the upload broke off; CDI's one-shot upload starts again from byte 0");
        backoff(attempt).await;
    }
}
