//! CDI's flags for the server, as Go's flag package reads them: `-p 8100`,
//! `-image-dir=/disk`, one or two dashes, value joined by `=` or in the next argument.
//! klog's output flags (`-v=3`, `-alsologtostderr`, ...) are accepted and ignored.

use std::ffi::OsString;
use std::path::PathBuf;

/// What the server was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Port on 127.0.0.1 (`-p`, default 8100).
    pub port: u16,
    /// The directory holding the one disk file (`-image-dir`, default `.`).
    pub image_dir: PathBuf,
    /// Written with the disk file's name once the server listens (`-ready-file`).
    pub ready_file: PathBuf,
    /// Created by the importer when it is done; the server then exits (`-done-file`).
    pub done_file: PathBuf,
    /// The container's root, checked for bootc images (`--root`, default `/`).
    pub root: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            port: 8100,
            image_dir: ".".into(),
            ready_file: "/shared/ready".into(),
            done_file: "/shared/done".into(),
            root: "/".into(),
        }
    }
}

/// A command line the server cannot run with (exit 2, as Go's flag package).
#[derive(Debug, PartialEq, Eq)]
pub enum UsageError {
    /// `-h`/`--help`: the usage, exit 0.
    Help,
    Unknown(String),
    Missing(String),
    BadPort(String),
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UsageError::Help => f.write_str(USAGE),
            UsageError::Unknown(a) => write!(f, "flag provided but not defined: {a}\n{USAGE}"),
            UsageError::Missing(a) => write!(f, "flag needs an argument: {a}\n{USAGE}"),
            UsageError::BadPort(v) => {
                write!(f, "invalid value {v:?} for flag -p: not a port\n{USAGE}")
            }
        }
    }
}

impl std::error::Error for UsageError {}

pub const USAGE: &str =
    "usage: serve-disk [-p PORT] [-image-dir DIR] [-ready-file FILE] [-done-file FILE]
  serves the one disk file in DIR on 127.0.0.1:PORT for a pullMethod: node import
  (CDI's cdi-containerimage-server)";

/// klog's flags: accepted, no effect (logs go to stderr).
const KLOG: [&str; 8] = [
    "v",
    "alsologtostderr",
    "logtostderr",
    "stderrthreshold",
    "log_dir",
    "log_file",
    "skip_headers",
    "one_output",
];

/// Parses the arguments after argv[0].
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Options, UsageError> {
    let mut o = Options::default();
    let mut args = args.into_iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            return Err(UsageError::Unknown(arg));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        if matches!(name, "h" | "help") {
            return Err(UsageError::Help);
        }
        if KLOG.contains(&name) {
            continue;
        }
        if !matches!(
            name,
            "p" | "image-dir" | "ready-file" | "done-file" | "root"
        ) {
            return Err(UsageError::Unknown(arg));
        }
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .ok_or_else(|| UsageError::Missing(arg.clone()))?,
        };
        match name {
            "p" => o.port = value.parse().map_err(|_| UsageError::BadPort(value))?,
            "image-dir" => o.image_dir = value.into(),
            "ready-file" => o.ready_file = value.into(),
            "done-file" => o.done_file = value.into(),
            _ => o.root = value.into(),
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Options, UsageError> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn cdi_command_line() {
        let o = p(&[
            "-p",
            "8100",
            "-image-dir",
            "/disk",
            "-ready-file=/shared/ready",
            "--done-file",
            "/shared/done",
            "-v=3",
        ])
        .expect("parse");
        assert_eq!(o.port, 8100);
        assert_eq!(o.image_dir, PathBuf::from("/disk"));
        assert_eq!(o.ready_file, PathBuf::from("/shared/ready"));
        assert_eq!(o.done_file, PathBuf::from("/shared/done"));
    }

    #[test]
    fn bad_lines_are_refused() {
        assert_eq!(p(&["-x"]), Err(UsageError::Unknown("-x".into())));
        assert_eq!(p(&["-p"]), Err(UsageError::Missing("-p".into())));
        assert_eq!(
            p(&["-p", "99999"]),
            Err(UsageError::BadPort("99999".into()))
        );
        assert_eq!(p(&["disk"]), Err(UsageError::Unknown("disk".into())));
        assert_eq!(p(&["--help"]), Err(UsageError::Help));
    }
}
