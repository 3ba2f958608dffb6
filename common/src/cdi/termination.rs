//! `/dev/termination-log`, as the CDI controller reads it (docs/cdi-contract.md section 1.8): JSON
//! on success and for the special exit-0 cases, one plain-text line on failure.

use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The controller refuses longer messages.
pub const MAX_LEN: usize = 4096;

/// Field names and order as Go serialises CDI's `TerminationMessage` (pointer fields
/// with `omitempty`: a field is absent when unset and present when false).
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TerminationMessage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scratch_space_required: Option<bool>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        rename = "preallocationApplied"
    )]
    pub preallocation_applied: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_passed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vddk_info: Option<VddkInfo>,
    /// Go maps serialise with sorted keys; so does a BTreeMap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Deckhouse's import report, after CDI's fields (the controller ignores keys it
    /// does not know, and CDI's part of the message stays byte-identical).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub import_info: Option<ImportInfo>,
}

/// What Deckhouse's importer and uploader report (its `monitoring.ImportInfo`): the
/// image as found under compression and tar, and the transfer's duration and speed.
/// Go's `omitempty`: a zero is left out.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct ImportInfo {
    /// Bytes of the disk image itself (a qcow2's file size; a raw image's length).
    #[serde(skip_serializing_if = "is_zero")]
    pub source_image_size: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub source_image_virtual_size: u64,
    /// qemu-img's name of the format (`raw`, `qcow2`, `vmdk`, `vpc`, `vhdx`, `vdi`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source_image_format: String,
    /// Nanoseconds, as Go serialises a `time.Duration`.
    #[serde(skip_serializing_if = "is_zero")]
    pub duration: u64,
    /// Bytes per second read from the source, over the whole duration.
    #[serde(skip_serializing_if = "is_zero")]
    pub average_speed: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl ImportInfo {
    /// From what was found and the source bytes read in `elapsed`.
    pub fn new(
        format: &str,
        image_size: u64,
        virtual_size: u64,
        source_bytes: u64,
        elapsed: std::time::Duration,
    ) -> Self {
        let secs = elapsed.as_secs_f64();
        ImportInfo {
            source_image_size: image_size,
            source_image_virtual_size: virtual_size,
            source_image_format: format.to_string(),
            duration: u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            average_speed: if secs > 0.0 {
                (source_bytes as f64 / secs) as u64
            } else {
                0
            },
        }
    }
}

/// CDI's struct has no json tags, hence the capitalised keys.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct VddkInfo {
    #[serde(rename = "Version")]
    pub version: String,
    #[serde(rename = "Host")]
    pub host: String,
}

pub const IMPORT_COMPLETE: &str = "Import Complete";

#[derive(Debug, thiserror::Error)]
pub enum TerminationError {
    #[error("termination message is {0} bytes, more than the {MAX_LEN} the controller accepts")]
    TooLong(usize),
    #[error("writing termination message to {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl TerminationMessage {
    /// `{"scratchSpaceRequired":false,"preallocationApplied":<p>,"message":"Import Complete"}`
    pub fn import_complete(preallocated: bool, labels: Option<BTreeMap<String, String>>) -> Self {
        TerminationMessage {
            scratch_space_required: Some(false),
            preallocation_applied: Some(preallocated),
            labels: labels.filter(|l| !l.is_empty()),
            message: Some(IMPORT_COMPLETE.into()),
            ..Default::default()
        }
    }

    pub fn to_json(&self) -> Result<String, TerminationError> {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        if s.len() > MAX_LEN && self.import_info.is_some() {
            // Deckhouse's extra keys are the first to go: CDI's fields must fit.
            let cdi_only = TerminationMessage {
                import_info: None,
                ..self.clone()
            };
            s = serde_json::to_string(&cdi_only).unwrap_or_default();
        }
        if s.len() > MAX_LEN {
            return Err(TerminationError::TooLong(s.len()));
        }
        Ok(s)
    }

    pub fn write(&self, path: &Path) -> Result<String, TerminationError> {
        let s = self.to_json()?;
        write_file(path, &s)?;
        Ok(s)
    }
}

/// The failure form: one line (CDI keeps only the first; we fold instead), at most
/// [`MAX_LEN`] bytes.
pub fn write_failure(path: &Path, message: &str) -> Result<String, TerminationError> {
    let mut line = crate::error::one_line(message);
    if line.len() > MAX_LEN {
        let mut cut = MAX_LEN;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
    }
    write_file(path, &line)?;
    Ok(line)
}

/// Makes a panic (with `panic = "abort"` in release builds) end like any other failure:
/// one line in the log, a termination message `<prefix>internal error: <what> at
/// <file:line>` and exit 1, instead of a pod that dies without a word.
pub fn install_panic_hook(log: Option<std::path::PathBuf>, prefix: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = format!("{prefix}internal error: {what}{at}");
        eprintln!("{}", crate::error::one_line(&message));
        if let Some(path) = &log {
            let _ = write_failure(path, &message);
        }
        std::process::exit(1);
    }));
}

fn write_file(path: &Path, content: &str) -> Result<(), TerminationError> {
    let werr = |source| TerminationError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(werr)?;
    f.write_all(content.as_bytes()).map_err(werr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_json_is_byte_exact() {
        let m = TerminationMessage::import_complete(false, None);
        assert_eq!(
            m.to_json().expect("json"),
            r#"{"scratchSpaceRequired":false,"preallocationApplied":false,"message":"Import Complete"}"#
        );
        let labels = BTreeMap::from([
            ("b.kubevirt.io/x".to_string(), "2".to_string()),
            ("a".to_string(), "1".to_string()),
        ]);
        let m = TerminationMessage::import_complete(true, Some(labels));
        assert_eq!(
            m.to_json().expect("json"),
            r#"{"scratchSpaceRequired":false,"preallocationApplied":true,"labels":{"a":"1","b.kubevirt.io/x":"2"},"message":"Import Complete"}"#
        );
        let blank = TerminationMessage {
            preallocation_applied: Some(false),
            message: Some(IMPORT_COMPLETE.into()),
            ..Default::default()
        };
        assert_eq!(
            blank.to_json().expect("json"),
            r#"{"preallocationApplied":false,"message":"Import Complete"}"#
        );
    }

    #[test]
    fn deckhouse_fields_follow_cdis_byte_identical_part() {
        let mut m = TerminationMessage::import_complete(false, None);
        m.import_info = Some(ImportInfo::new(
            "qcow2",
            1000,
            4096,
            2000,
            std::time::Duration::from_millis(1500),
        ));
        assert_eq!(
            m.to_json().expect("json"),
            concat!(
                r#"{"scratchSpaceRequired":false,"preallocationApplied":false,"message":"Import Complete","#,
                r#""source-image-size":1000,"source-image-virtual-size":4096,"source-image-format":"qcow2","duration":1500000000,"average-speed":1333}"#
            )
        );
    }

    #[test]
    fn failure_is_one_line_and_too_long_json_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("log");
        let line = write_failure(&p, "Unable to process data: a\nb").expect("write");
        assert_eq!(line, "Unable to process data: a b");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), line);
        let big = TerminationMessage {
            message: Some("x".repeat(5000)),
            ..Default::default()
        };
        assert!(matches!(big.to_json(), Err(TerminationError::TooLong(_))));
        // Labels that leave no room: the Deckhouse keys are dropped, CDI's kept.
        let labels = BTreeMap::from([("k".to_string(), "v".repeat(3990))]);
        let mut m = TerminationMessage::import_complete(false, Some(labels));
        m.import_info = Some(ImportInfo::new(
            "raw",
            1,
            1,
            1,
            std::time::Duration::from_secs(1),
        ));
        let s = m.to_json().expect("fits without the extra keys");
        assert!(!s.contains("source-image-format") && s.len() <= MAX_LEN);
    }
}
