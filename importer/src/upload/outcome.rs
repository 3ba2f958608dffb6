//! How an upload ends: the answer to one the pipeline refused, the pipeline's result
//! awaited, and the outcome handed to the server loop (which writes CDI's termination
//! message). Shared by the one-shot endpoints and resumable uploads.

use super::{Busy, Server, UploadFailed};
use crate::failure::Failure;
use bytes::Bytes;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::ErrorKind;
use http_body_util::Full;
use hyper::{Response, StatusCode};

type Resp = Response<Full<Bytes>>;

/// CDI's answer to an upload the pipeline refused: the client's fault (400: a digest
/// that does not match, a disk larger than the volume) or ours (500).
pub(super) fn failure_response(f: &Failure) -> Resp {
    let detail = f.detail();
    let (status, body) = match f.kind() {
        // The client's bytes are not the ones it vouched for; the disk was emptied.
        ErrorKind::ChecksumMismatch => (StatusCode::BAD_REQUEST, detail),
        // A full volume is TooLarge by its io::ErrorKind where it was raised.
        ErrorKind::TooLarge => (
            StatusCode::BAD_REQUEST,
            format!("effective image size is larger than the reported available storage: {detail}"),
        ),
        ErrorKind::ScratchRequired => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "scratch space required and none found".into(),
        ),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, detail),
    };
    let mut r = Response::new(Full::new(Bytes::from(format!(
        "Saving stream failed: {body}"
    ))));
    *r.status_mut() = status;
    r
}

pub(super) async fn join(
    work: tokio::task::JoinHandle<Result<TerminationMessage, Failure>>,
) -> Result<TerminationMessage, Failure> {
    work.await.unwrap_or_else(|e| {
        Err(Failure::Process {
            kind: ErrorKind::Io,
            message: format!("pipeline thread failed: {e}"),
        })
    })
}

/// Records the outcome; the server loop writes the termination message and exits.
/// CDI's messages: a clone target says "Clone Complete", an upload "Upload Complete".
pub(super) fn finish(
    server: &Server,
    busy: Busy,
    result: Result<TerminationMessage, UploadFailed>,
    clone: bool,
) {
    let result = result.map(|m| {
        TerminationMessage {
            preallocation_applied: m.preallocation_applied,
            // Deckhouse's report belongs to uploads; a clone target says only CDI's.
            import_info: if clone { None } else { m.import_info },
            message: Some(
                if clone {
                    "Clone Complete"
                } else {
                    "Upload Complete"
                }
                .into(),
            ),
            ..Default::default()
        }
    });
    // Done before the server loop hears of it; a failure frees the server.
    match &result {
        Ok(_) => busy.complete(),
        Err(_) => drop(busy),
    }
    let _ = server.finished.send(Some(result));
}
