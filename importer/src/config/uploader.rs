//! `ferrydisk upload`'s configuration: the file, where it goes and by which protocol,
//! the token, how the proxy is trusted, and the retry policy.

use crate::cli::UploaderArgs;
use ferrydisk_common::cdi::upload::{route, RESUMABLE};
use std::path::PathBuf;
use std::time::Duration;

/// Where an upload goes, by the URL's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `https://proxy`: resumable if the proxy offers it, else CDI's one-shot upload.
    Auto { base: String },
    /// The tus creation URL itself.
    Resumable { create: String },
    /// One of CDI's one-shot paths.
    OneShot { url: String },
}

#[derive(Debug, Clone)]
pub struct UploaderConfig {
    pub file: PathBuf,
    pub target: Target,
    pub token: String,
    /// PEM certificates to trust besides the system's.
    pub cacert: Option<Vec<u8>>,
    pub insecure: bool,
    pub retries: u32,
    pub idle: Duration,
    pub checksum: bool,
    /// Draw a progress bar (a terminal, unless told not to).
    pub bar: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("give the upload token with --token, --token-file or FERRYDISK_UPLOAD_TOKEN")]
    NoToken,
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--url {0:?}: {1}")]
    Url(String, String),
}

impl UploaderConfig {
    pub fn from_args(a: UploaderArgs) -> Result<Self, ConfigError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| ConfigError::Read {
                path: p.clone(),
                source,
            })
        };
        let token = match (&a.token, &a.token_file) {
            (Some(t), _) => t.trim().to_string(),
            (None, Some(f)) => String::from_utf8_lossy(&read(f)?).trim().to_string(),
            (None, None) => String::new(),
        };
        if token.is_empty() {
            return Err(ConfigError::NoToken);
        }
        let cacert = a.cacert.as_ref().map(read).transpose()?;
        use std::io::IsTerminal;
        Ok(UploaderConfig {
            target: target(&a.url)?,
            file: a.file,
            token,
            cacert,
            insecure: a.insecure,
            retries: a.retries,
            idle: Duration::from_secs(a.idle_timeout),
            checksum: !a.no_checksum,
            bar: !a.no_progress_bar && std::io::stderr().is_terminal(),
        })
    }
}

/// The protocol a URL's path names.
fn target(url: &str) -> Result<Target, ConfigError> {
    let bad = |why: &str| ConfigError::Url(url.to_string(), why.to_string());
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !matches!(parsed.scheme(), "https" | "http") || parsed.host_str().is_none() {
        return Err(bad("expected https://HOST[:PORT][/PATH]"));
    }
    let path = parsed.path().trim_end_matches('/');
    let base = url.trim_end_matches('/');
    Ok(if path.is_empty() {
        Target::Auto {
            base: base.to_string(),
        }
    } else if path == RESUMABLE {
        Target::Resumable {
            create: base.to_string(),
        }
    } else if route(path).is_some_and(|r| !r.form && !r.archive) {
        Target::OneShot {
            url: base.to_string(),
        }
    } else {
        return Err(bad(&format!(
            "the path is neither {RESUMABLE} nor one of CDI's upload paths"
        )));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_names_the_protocol() {
        assert_eq!(
            target("https://proxy:8443/").expect("url"),
            Target::Auto {
                base: "https://proxy:8443".into()
            }
        );
        assert!(matches!(
            target("https://proxy/v1beta1/upload-resumable"),
            Ok(Target::Resumable { .. })
        ));
        assert!(matches!(
            target("https://proxy/v1beta1/upload-async"),
            Ok(Target::OneShot { .. })
        ));
        assert!(target("https://proxy/v1beta1/upload-form").is_err());
        assert!(target("ftp://proxy").is_err());
        assert!(target("proxy:8443").is_err());
    }
}
