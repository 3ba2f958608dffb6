//! The one place where failures become exit codes and termination messages (contract
//! section 1.8): plain text + exit 1, except a checksum mismatch (JSON + exit 0, so the
//! controller marks it fatal instead of restart-looping).

use ferrydisk_common::ErrorKind;

#[derive(Debug, Clone)]
pub enum Failure {
    /// The source could not be reached or refused us: `Unable to connect to <src> data source: ...`.
    Connect {
        source_name: String,
        kind: ErrorKind,
        message: String,
    },
    /// Anything after connecting: `Unable to process data: ...`.
    Process { kind: ErrorKind, message: String },
    /// `Unable to create blank image: ...`.
    Blank { kind: ErrorKind, message: String },
    /// `Unknown data source: <src>`.
    UnknownSource(String),
    /// `Timeout waiting for file <path>`.
    ReadyTimeout(String),
    /// A bad setting (PREALLOCATION, content type, size).
    Config(String),
    /// A push streaming the disk as it is imported met a source that writes the disk
    /// twice (a containerDisk's overlay chain): the push spools instead.
    StreamTaken,
}

impl Failure {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Failure::Connect { kind, .. }
            | Failure::Process { kind, .. }
            | Failure::Blank { kind, .. } => *kind,
            Failure::ReadyTimeout(_) => ErrorKind::Network,
            Failure::UnknownSource(_) | Failure::Config(_) | Failure::StreamTaken => {
                ErrorKind::Config
            }
        }
    }

    /// The text CDI would put in the termination log.
    pub fn message(&self) -> String {
        match self {
            Failure::Connect {
                source_name,
                message,
                ..
            } => format!("Unable to connect to {source_name} data source: {message}"),
            Failure::Process { message, .. } => format!("Unable to process data: {message}"),
            Failure::Blank { message, .. } => format!("Unable to create blank image: {message}"),
            Failure::UnknownSource(s) => format!("Unknown data source: {s}"),
            Failure::ReadyTimeout(p) => format!("Timeout waiting for file {p}"),
            Failure::Config(m) => m.clone(),
            Failure::StreamTaken => "a streamed push cannot start the disk over".into(),
        }
    }

    /// The message without CDI's importer prefix (the upload server adds its own).
    pub fn detail(&self) -> String {
        match self {
            Failure::Connect { message, .. }
            | Failure::Process { message, .. }
            | Failure::Blank { message, .. } => message.clone(),
            other => other.message(),
        }
    }

    /// Checksum mismatches and "scratch space required" end with exit 0 and a JSON
    /// message, as CDI does: the controller reads JSON only after exit 0.
    pub fn exit_code(&self) -> i32 {
        match self.kind() {
            ErrorKind::ChecksumMismatch | ErrorKind::ScratchRequired => 0,
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_follow_cdi() {
        let f = Failure::Connect {
            source_name: "http".into(),
            kind: ErrorKind::Network,
            message: "refused".into(),
        };
        assert_eq!(
            f.message(),
            "Unable to connect to http data source: refused"
        );
        assert_eq!(f.exit_code(), 1);
        assert_eq!(
            Failure::UnknownSource("ftp".into()).message(),
            "Unknown data source: ftp"
        );
        let c = Failure::Process {
            kind: ErrorKind::ChecksumMismatch,
            message: "checksum mismatch".into(),
        };
        assert_eq!(c.exit_code(), 0);
    }
}
