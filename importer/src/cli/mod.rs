//! The `importer` command line. Every CDI env var is read through clap (`env = ...`)
//! and every fixed path has a flag, so the same binary runs unchanged in a CDI pod and
//! on a workstation.

mod clone;
mod import;
mod push;
mod upload;
mod uploader;
mod volume;

pub use clone::{ClonerArgs, PollerArgs, ServeArgs, SizeArgs, StartupArgs};
pub use import::{ImportArgs, InspectArgs};
pub use push::{Convert, PushArgs, PushOptions};
pub use upload::UploadArgs;
pub use uploader::UploaderArgs;
pub use volume::{InspectOutput, OutputFormat, ProxyArgs, VolumeArgs};

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ferrydisk",
    version,
    propagate_version = true,
    about = "Streams VM disks from any source onto a volume or into a registry: KubeVirt CDI's data-plane roles in one binary",
    long_about = "Streams VM disks from any source onto a volume or into a registry: KubeVirt CDI's \
data-plane roles in one binary.\n\nStarted as `importer` with no subcommand (or under a CDI \
name: cdi-importer, cdi-uploadserver, cdi-cloner, ...) it runs that CDI role from its \
environment, as CDI's controller starts it. As `ferrydisk`, name the role: \
`ferrydisk import|push|inspect|upload-server|...`; `ferrydisk ROLE --help` lists its \
options and environment variables."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Import a disk onto a file or block device (CDI's importer; the default role).
    Import(Box<ImportArgs>),
    /// Take uploads and clone streams for one volume (CDI's cdi-uploadserver).
    UploadServer(Box<UploadArgs>),
    /// Serve a containerDisk's disk on loopback for pullMethod node (cdi-containerimage-server).
    ///
    /// Go-style single-dash flags are accepted, as CDI's controller passes them.
    ServeDisk(ServeArgs),
    /// Print an image's virtual size to the termination message (cdi-image-size-detection).
    ///
    /// Run by the clone controller; Go-style single-dash flags are accepted.
    SizeDetection(SizeArgs),
    /// Stream a volume to a clone target's upload server (CDI's cdi-cloner).
    ///
    /// Go-style single-dash flags are accepted.
    CloneSource(ClonerArgs),
    /// The cloner image's entrypoint (CDI's cloner_startup.sh): env VOLUME_MODE,
    /// MOUNT_POINT, PREALLOCATION, then clone-source.
    #[command(hide = true)]
    ClonerStartup(StartupArgs),
    /// Record a DataImportCron poll: the image's digest (cdi-source-update-poller).
    ///
    /// Go-style single-dash flags are accepted.
    SourceUpdatePoller(PollerArgs),
    /// Push a disk or a whole VM into a registry, a layout or an archive, streamed.
    ///
    /// As a containerDisk or as KubeVirt's VM artifact; from a file, a volume or any
    /// import source; a layer the registry has is not sent again.
    Push(Box<PushArgs>),
    /// Show what an import would find (layers, format, sizes, digests), writing nothing.
    ///
    /// As JSON or a table.
    Inspect(Box<InspectArgs>),
    /// Upload a disk image through CDI's upload proxy, resuming after drops.
    ///
    /// A progress bar on a terminal; the file's sha256 verified by the server.
    Upload(Box<UploaderArgs>),
}

/// Subcommands the binary knows; anything else on the command line means `import`
/// (CDI starts the container with only `-v=<n>`).
pub const SUBCOMMANDS: &[&str] = &[
    "import",
    "upload-server",
    "serve-disk",
    "size-detection",
    "clone-source",
    "cloner-startup",
    "source-update-poller",
    "push",
    "inspect",
    "upload",
    "help",
];

/// CDI's binary names, for images that link them to this binary: the subcommand each
/// one means when the program is started under that name.
const ARGV0: &[(&str, &str)] = &[
    ("cdi-uploadserver", "upload-server"),
    ("cdi-importer", "import"),
    ("cdi-containerimage-server", "serve-disk"),
    ("cdi-image-size-detection", "size-detection"),
    ("cdi-cloner", "clone-source"),
    ("cloner_startup.sh", "cloner-startup"),
    ("cdi-source-update-poller", "source-update-poller"),
    // CDI copies the server to /shared/server and starts it under that name.
    ("server", "serve-disk"),
];

/// Go's `strconv.ParseBool`: the exact spellings CDI accepts.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Inserts the default `import` subcommand when none is given.
pub fn with_default_subcommand(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let argv0 = args
        .first()
        .map(|a| {
            std::path::Path::new(a)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    if let Some((_, sub)) = ARGV0.iter().find(|(name, _)| *name == argv0) {
        args.insert(1.min(args.len()), (*sub).into());
    }
    // `ferrydisk` is for people at a terminal: a role is named, and alone it shows help.
    if argv0 == "ferrydisk" {
        if args.len() < 2 {
            args.push("--help".into());
        }
        return match args.get(1).and_then(|a| a.to_str()) {
            Some("serve-disk" | "size-detection" | "clone-source" | "source-update-poller") => {
                go_flags(args)
            }
            _ => args,
        };
    }
    if matches!(
        args.get(1).and_then(|a| a.to_str()),
        Some("serve-disk" | "size-detection" | "clone-source" | "source-update-poller")
    ) {
        return go_flags(args);
    }
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    // `importer --help` lists every role, one line each (`importer import --help` has
    // the import options and their env names); anything else with no role named is an
    // import, as CDI's controller runs it.
    let is_top =
        SUBCOMMANDS.contains(&first) || matches!(first, "-V" | "--version" | "-h" | "--help");
    if !is_top {
        args.insert(1.min(args.len()), "import".into());
    }
    args
}

/// Go's flag package takes `-image-dir x` and `-image-dir=x`: single-dash long flags
/// become clap's double-dash ones (CDI starts the server that way).
fn go_flags(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .map(|a| match a.to_str() {
            Some(s)
                if s.len() > 2
                    && s.starts_with('-')
                    && !s.starts_with("--")
                    && s.as_bytes()[1].is_ascii_alphabetic()
                    && !s.starts_with("-p=") =>
            {
                format!("-{s}").into()
            }
            _ => a,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> ImportArgs {
        let argv = with_default_subcommand(args.iter().map(Into::into).collect());
        match Cli::try_parse_from(argv).expect("parse").command {
            Command::Import(a) => *a,
            _ => panic!("not an import"),
        }
    }

    #[test]
    fn klog_verbosity_and_default_subcommand() {
        assert_eq!(parse(&["importer", "-v=3"]).volume.verbosity, 3);
        assert_eq!(parse(&["importer"]).source, "http");
        assert_eq!(
            parse(&["importer", "import", "--endpoint", "http://x/"]).endpoint,
            "http://x/"
        );
    }

    #[test]
    fn cdi_server_command_line() {
        let argv = with_default_subcommand(
            [
                "/shared/server",
                "-p",
                "8100",
                "-image-dir",
                "/disk",
                "-ready-file=/shared/ready",
                "-done-file",
                "/shared/done",
            ]
            .iter()
            .map(Into::into)
            .collect(),
        );
        match Cli::try_parse_from(argv).expect("parse").command {
            Command::ServeDisk(a) => {
                assert_eq!(a.port, 8100);
                assert_eq!(a.image_dir, std::path::PathBuf::from("/disk"));
                assert_eq!(a.ready_file, std::path::PathBuf::from("/shared/ready"));
            }
            _ => panic!("serve-disk expected"),
        }
    }

    #[test]
    fn go_bools() {
        assert_eq!(parse_go_bool("True"), Some(true));
        assert_eq!(parse_go_bool("0"), Some(false));
        assert_eq!(parse_go_bool(""), None);
        assert_eq!(parse_go_bool("yes"), None);
    }
}
