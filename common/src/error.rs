//! The error *kind* every module error maps to. The kind decides whether a failure is
//! worth retrying (kubelet restarts the pod either way, as CDI does, but the log says
//! which) and how the termination message is phrased.

use std::fmt;

/// What went wrong, coarsely. Module errors carry the detail; this carries the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The source could not be reached or dropped us beyond our retries.
    Network,
    /// Reading or writing local storage failed.
    Io,
    /// The input is not what it claims to be (corrupt compression, bad tar).
    CorruptImage,
    /// The input is well-formed but uses something we do not (yet) convert.
    UnsupportedFormat,
    /// The image does not fit the volume.
    TooLarge,
    /// The source was refused by the server (auth, 404): retrying will not help.
    SourceRefused,
    /// The caller's configuration is wrong (bad env value, missing endpoint).
    Config,
    /// The data does not match the checksum the user gave.
    ChecksumMismatch,
    /// The format needs random access and no scratch volume is mounted: CDI's
    /// `scratchSpaceRequired` answer makes the controller retry with one.
    ScratchRequired,
    /// The source changed under a download that had to resume (validators differ or are
    /// missing): the import starts again from byte 0 instead of splicing two files.
    SourceChanged,
}

impl ErrorKind {
    /// Whether the same import may succeed if simply run again.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Network
                | ErrorKind::Io
                | ErrorKind::ScratchRequired
                | ErrorKind::SourceChanged
        )
    }

    /// The log field value: `retryable` or `terminal`.
    pub fn class(self) -> &'static str {
        if self.is_retryable() {
            "retryable"
        } else {
            "terminal"
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::Network => "network",
            ErrorKind::Io => "io",
            ErrorKind::CorruptImage => "corrupt-image",
            ErrorKind::UnsupportedFormat => "unsupported-format",
            ErrorKind::TooLarge => "too-large",
            ErrorKind::SourceRefused => "source-refused",
            ErrorKind::Config => "config",
            ErrorKind::ChecksumMismatch => "checksum-mismatch",
            ErrorKind::ScratchRequired => "scratch-required",
            ErrorKind::SourceChanged => "source-changed",
        };
        f.write_str(s)
    }
}

/// A failure raised by a source (network, upload body) and carried through the
/// decoders as an `io::Error`. The pipeline finds it again with [`find_in_chain`] so a
/// dropped connection is reported as a network failure, not as a corrupt gzip stream.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    pub kind: ErrorKind,
    pub message: String,
}

impl SourceError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        SourceError {
            kind,
            message: message.into(),
        }
    }

    pub fn into_io(self) -> std::io::Error {
        std::io::Error::other(self)
    }
}

/// Finds a `T` anywhere in an error chain, looking inside `io::Error` payloads too
/// (`io::Error::source` skips its own payload, so a plain `source()` walk misses it).
pub fn find_in_chain<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(t) = find_in_chain::<T>(inner) {
                    return Some(t);
                }
            }
        }
        cur = e.source();
    }
    None
}

/// What an `io::Error` says about itself, wherever it was raised: the kind of a
/// [`SourceError`] it carries (a dropped connection inside a gzip stream is a network
/// failure, not corruption), or [`ErrorKind::TooLarge`] for a full volume or quota
/// (by `io::ErrorKind`, never by message text). `None`: the caller's context decides.
pub fn io_kind(e: &std::io::Error) -> Option<ErrorKind> {
    if let Some(s) = find_in_chain::<SourceError>(e) {
        return Some(s.kind);
    }
    match e.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            Some(ErrorKind::TooLarge)
        }
        _ => None,
    }
}

/// Joins an error and its sources into one line, as CDI's `<err chain>` messages do.
pub fn chain_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    one_line(&out)
}

/// CDI keeps only the first line of a termination message; we fold instead of cutting
/// so nothing after a newline is lost. Other control characters are escaped
/// ([`sanitize`]): messages quote names and labels taken from untrusted images.
pub fn one_line(s: &str) -> String {
    sanitize(
        &s.split(['\n', '\r'])
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Text from an image (tar entry names, labels, format strings) made safe for a
/// terminal, a log line and the termination message: every control character (C0, DEL,
/// C1, so ESC sequences too) and bidi override is written as `\u{..}`.
pub fn sanitize(s: &str) -> String {
    if !s.chars().any(is_unsafe_char) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c == '\t' {
            out.push(' ');
        } else if is_unsafe_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

fn is_unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_source_error_inside_io_error() {
        let io = SourceError::new(ErrorKind::Network, "connection reset").into_io();
        let wrapped = std::io::Error::new(std::io::ErrorKind::InvalidData, io);
        let found = find_in_chain::<SourceError>(&wrapped).expect("found");
        assert_eq!(found.kind, ErrorKind::Network);
    }

    #[test]
    fn one_line_folds_newlines() {
        assert_eq!(one_line("a\nb\r\n c \n"), "a b c");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(sanitize("disk\x1b[2J.img"), "disk\\u{1b}[2J.img");
        assert_eq!(one_line("a\x07b\nc\u{202e}d"), "a\\u{7}b c\\u{202e}d");
        assert_eq!(sanitize("plain ünïcode"), "plain ünïcode");
    }

    #[test]
    fn io_errors_classify_by_kind_and_payload() {
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        assert_eq!(io_kind(&full), Some(ErrorKind::TooLarge));
        let net = SourceError::new(ErrorKind::Network, "reset").into_io();
        let wrapped = std::io::Error::new(std::io::ErrorKind::InvalidData, net);
        assert_eq!(io_kind(&wrapped), Some(ErrorKind::Network));
        let plain = std::io::Error::other("No space left on device");
        assert_eq!(io_kind(&plain), None, "message text never classifies");
    }

    #[test]
    fn kinds_classify() {
        assert!(ErrorKind::Network.is_retryable());
        assert_eq!(ErrorKind::TooLarge.class(), "terminal");
    }
}
