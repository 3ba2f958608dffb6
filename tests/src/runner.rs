//! The importer run the way a CDI pod runs it: env vars only, plus paths as flags, and
//! what it left behind (exit code, termination message, stderr).

use crate::bins::bin;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One importer run configured like a CDI pod: env vars only, plus paths as flags.
pub struct Importer {
    pub cmd: Command,
    pub termination_log: PathBuf,
    block_device: PathBuf,
}

pub struct Outcome {
    pub code: i32,
    pub termination: String,
    pub stderr: String,
}

impl Importer {
    /// An importer writing to `<dir>/data/disk.img` (block device path absent).
    pub fn new(dir: &Path) -> Self {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let termination_log = dir.join("termination-log");
        let mut cmd = Command::new(bin("importer"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PREALLOCATION", "false")
            .env("IMPORTER_CONTENTTYPE", "kubevirt")
            .env("OWNER_UID", "test-owner")
            .arg("-v=1")
            .arg("--data-dir")
            .arg(&data)
            .arg("--termination-log")
            .arg(&termination_log)
            .arg("--extra-headers-dir")
            .arg(dir.join("no-extra-headers"))
            .arg("--proxy-cert-dir")
            .arg(dir.join("no-proxy-certs"));
        Importer {
            cmd,
            termination_log,
            block_device: dir.join("no-such-block-device"),
        }
    }

    /// The path whose existence selects block mode (CDI's /dev/cdi-block-volume).
    pub fn block_device(mut self, dev: impl Into<PathBuf>) -> Self {
        self.block_device = dev.into();
        self
    }

    /// Starts the importer without waiting for it.
    pub fn spawn(mut self) -> std::process::Child {
        self.cmd.arg("--block-device").arg(&self.block_device);
        self.cmd.spawn().expect("spawn importer")
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.cmd.env(k, v);
        self
    }

    pub fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.arg(a);
        self
    }

    /// `http` source from `url`.
    pub fn http(self, url: &str) -> Self {
        self.env("IMPORTER_SOURCE", "http")
            .env("IMPORTER_ENDPOINT", url)
            .arg("--metrics-addr")
            .arg("none")
    }

    /// A local file as the source (`file://`, seekable: formats re-read instead of holding).
    pub fn file(self, path: &Path) -> Self {
        self.http(&format!("file://{}", path.display()))
            .arg("--allow-local-files")
    }

    pub fn run(mut self) -> Outcome {
        let _ = std::fs::remove_file(&self.termination_log);
        self.cmd.arg("--block-device").arg(&self.block_device);
        let out = self.cmd.output().expect("run importer");
        Outcome {
            code: out.status.code().unwrap_or(-1),
            termination: std::fs::read_to_string(&self.termination_log).unwrap_or_default(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A success message without the Deckhouse keys that follow CDI's fields
/// (`"source-image-size"`, ..., `"average-speed"`): what CDI's controller reads.
pub fn cdi_part(termination: &str) -> String {
    const DECKHOUSE: [&str; 5] = [
        r#","source-image-size":"#,
        r#","source-image-virtual-size":"#,
        r#","source-image-format":"#,
        r#","duration":"#,
        r#","average-speed":"#,
    ];
    match DECKHOUSE.iter().filter_map(|k| termination.find(k)).min() {
        Some(i) if termination.ends_with('}') => format!("{}}}", &termination[..i]),
        _ => termination.to_string(),
    }
}

/// The Deckhouse keys of a success message, parsed.
pub fn deckhouse_part(termination: &str) -> serde_json::Value {
    serde_json::from_str(termination).unwrap_or_else(|e| panic!("{termination:?}: {e}"))
}

impl Outcome {
    pub const SUCCESS: &'static str = r#"{"scratchSpaceRequired":false,"preallocationApplied":false,"message":"Import Complete"}"#;

    pub fn assert_success(&self) {
        assert_eq!(
            self.code, 0,
            "importer failed: {}\n{}",
            self.termination, self.stderr
        );
        assert_eq!(
            cdi_part(&self.termination),
            Self::SUCCESS,
            "stderr: {}",
            self.stderr
        );
    }

    /// Exit 1, one plain-text line containing `needle`, no success JSON.
    pub fn assert_failure(&self, needle: &str) {
        assert_eq!(
            self.code, 1,
            "expected failure, got {}: {}\n{}",
            self.code, self.termination, self.stderr
        );
        assert!(
            !self.termination.contains('\n'),
            "one line: {:?}",
            self.termination
        );
        assert!(
            !self.termination.contains("Import Complete"),
            "{}",
            self.termination
        );
        assert!(
            self.termination.contains(needle),
            "termination {:?} lacks {needle:?}\n{}",
            self.termination,
            self.stderr
        );
    }
}
