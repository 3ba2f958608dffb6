//! The HTTP side every URL source shares (http, s3, gcs, imageio): the client, the
//! download settings, and a download streamed onto the disk, started again when the
//! source changed under a resume.

use crate::config::import::Net;
use crate::disk::{blocking, write_stream, DiskPlan};
use crate::failure::Failure;
use crate::sources::{client, http};
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::ErrorKind;
use std::path::PathBuf;
use std::sync::Arc;

/// The HTTP client every URL source uses: CA dirs, proxies, TLS policy.
pub fn http_client(
    net: &Net,
    source_name: &str,
    localhost_names: Vec<String>,
) -> Result<client::HttpClient, Failure> {
    client::build(&client::ClientOptions {
        ca_dirs: net.ca_dirs.iter().map(PathBuf::as_path).collect(),
        insecure: net.insecure,
        proxies: net.proxies.clone(),
        localhost_names,
    })
    .map_err(|e| connect_err(source_name, ErrorKind::Config, e.to_string()))
}

/// The download settings every URL source shares; object stores override a few. The
/// extra headers (env and secret files) travel with the credentials: only to the URL's
/// own origin.
pub fn http_options(
    net: &Net,
    source_name: &str,
    auth: http::Auth,
    progress: Arc<Progress>,
) -> Result<http::HttpOptions, Failure> {
    let secret_headers = client::parse_headers(&net.extra_headers)
        .map_err(|e| connect_err(source_name, ErrorKind::Config, e.to_string()))?;
    Ok(http::HttpOptions {
        auth,
        if_match: false,
        what: None,
        credentials_hint: http::ACCESS_KEY_HINT,
        retries: net.retries,
        idle_timeout: net.idle_timeout,
        progress,
        secret_headers,
        refuse_internal_redirects: net.refuse_internal_redirects,
    })
}

pub fn connect_err(source_name: &str, kind: ErrorKind, message: String) -> Failure {
    Failure::Connect {
        source_name: source_name.into(),
        kind,
        message,
    }
}

/// Streams `url` onto the disk, starting again from byte 0 up to `max_restarts` times
/// when the source changed under a resume.
pub async fn download(
    disk: DiskPlan,
    client: &client::HttpClient,
    url: &str,
    opts: http::HttpOptions,
    source_name: &str,
    max_restarts: u32,
) -> Result<TerminationMessage, Failure> {
    let progress = opts.progress.clone();
    let disk = Arc::new(disk);
    let mut restarts = 0;
    loop {
        let download = http::open(client.clone(), url, opts.clone())
            .await
            .map_err(|e| connect_err(source_name, e.kind(), e.to_string()))?;
        let content_length = download.content_length;
        let reader = download.reader;
        let (d, p) = (disk.clone(), progress.clone());
        let result =
            blocking(move || write_stream(&d, reader, content_length, p, None, false)).await;
        match result {
            // The destination was emptied when the attempt failed; a new one rewrites it.
            Err(f) if f.kind() == ErrorKind::SourceChanged && restarts < max_restarts => {
                restarts += 1;
                tracing::warn!(restart = restarts, error = %f.detail(), "the source changed under a resumed download; importing again from byte 0");
                progress.restart();
            }
            other => return other,
        }
    }
}
