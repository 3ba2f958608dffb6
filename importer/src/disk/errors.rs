//! Failures of the write half, in the words CDI's termination message uses.

use crate::failure::Failure;
use ferrydisk_common::error::chain_line;
use ferrydisk_common::pipeline::PipelineError;
use ferrydisk_common::ErrorKind;
use std::io::{self};

/// A local I/O failure; a full volume is `TooLarge` (by `io::ErrorKind`).
pub fn io_fail(what: String, e: io::Error) -> Failure {
    Failure::Process {
        kind: ferrydisk_common::error::io_kind(&e).unwrap_or(ErrorKind::Io),
        message: format!("{what}: {e}"),
    }
}

pub(super) fn process_failure(e: PipelineError) -> Failure {
    Failure::Process {
        kind: e.kind(),
        message: chain_line(&e),
    }
}

pub(super) fn checksum_failure(e: ferrydisk_common::checksum::ChecksumError) -> Failure {
    Failure::Process {
        kind: ErrorKind::ChecksumMismatch,
        message: e.to_string(),
    }
}
