//! Pushing what an import reads: an HTTP(S) URL, `docker://`, `oci:`, `oci-archive:`,
//! `docker-archive:`, or a local file to be converted first.
//!
//! The import runs whole (the same sources, validation, decompression and conversion
//! as `importer import`) into a sparse `disk.img` in a spool directory, which is then
//! pushed as a local file and removed. This spools, and says so in its log line: a
//! containerDisk's tar header needs the disk's size before its bytes, the registry's
//! HEAD check needs the layer digest before the upload, and only raw sources arrive in
//! guest order. The spool holds the converted disk's allocated bytes (holes stay
//! holes; qcow2 output stores no zero clusters), never the virtual size, and the
//! import's decompression is capped by the spool's free space as a volume's is.

use crate::cli::OutputFormat;
use crate::config::import::{ImportConfig, Net};
use crate::config::PushConfig;
use crate::disk::{blocking, write_image, DiskPlan, Output, StreamSink};
use crate::failure::Failure;
use crate::import;
use ferrydisk_common::progress::Progress;
use std::path::PathBuf;
use std::sync::Arc;

/// Why the import of a push's source failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory in {}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {shown}: {}", ferrydisk_common::error::one_line(&failure.message()))]
    Import { shown: String, failure: Failure },
}

/// What the import found in the source: the image config's labels say this, not what
/// the spooled payload is.
#[derive(Debug, Clone)]
pub struct Origin {
    /// qemu-img's format name (`qcow2`, `vpc`, ...).
    pub format: String,
    pub virtual_size: u64,
    /// The image's own size (under any compression and tar).
    pub source_size: u64,
}

impl From<&ferrydisk_common::cdi::termination::ImportInfo> for Origin {
    /// What an import (or an upload) reported finding.
    fn from(i: &ferrydisk_common::cdi::termination::ImportInfo) -> Self {
        Origin {
            format: i.source_image_format.clone(),
            virtual_size: i.source_image_virtual_size,
            source_size: i.source_image_size,
        }
    }
}

pub struct Spooled {
    /// Removed, with the disk, when this drops.
    _dir: tempfile::TempDir,
    pub disk: PathBuf,
    pub origin: Origin,
    /// The source image config's `KUBEVIRT_IO_` entries (they become PVC labels).
    pub env: Vec<String>,
}

/// Imports the push's source into a spool directory as `output` (a qcow2 source with
/// qcow2 output keeps its bytes).
pub async fn import(cfg: &PushConfig, output: OutputFormat) -> Result<Spooled, SpoolError> {
    import_into(cfg, output, None).await
}

/// [`import`], or with `stream` the disk written into that target as it is imported
/// (the spool directory then only holds the import's bookkeeping, no disk).
pub async fn import_into(
    cfg: &PushConfig,
    output: OutputFormat,
    stream: Option<StreamSink>,
) -> Result<Spooled, SpoolError> {
    let shown = cfg.source.to_string_lossy().to_string();
    let (kind, endpoint) = crate::inspect::classify(&shown);
    let base = cfg
        .payload
        .spool_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("ferrydisk-push-")
        .tempdir_in(&base)
        .map_err(|source| SpoolError::Dir {
            dir: base.clone(),
            source,
        })?;
    let data = dir.path().join("data");
    std::fs::create_dir(&data).map_err(|source| SpoolError::Dir {
        dir: data.clone(),
        source,
    })?;
    let mut disk = DiskPlan::local(&data, &dir.path().join("scratch"), output);
    if stream.is_some() {
        tracing::info!(source = %crate::sources::redact::url(&endpoint), "streaming the import into the upload");
    } else {
        tracing::info!(
            source = %crate::sources::redact::url(&endpoint),
            spool = %dir.path().display(),
            output_format = ?output,
            "spooling the import before pushing: a tar layer needs the disk's size and the registry check its digest before any byte goes up"
        );
    }
    if let Some(s) = stream {
        disk.output = Output::stream(s);
    }
    let registry = kind == crate::config::import::SourceKind::Registry;
    let net = source_net(cfg, registry);
    let plan = ImportConfig::local(kind, endpoint, disk, net, cfg.source_registry.clone());
    let failed = |failure: Failure| SpoolError::Import {
        shown: shown.clone(),
        failure,
    };
    let progress = Arc::new(Progress::default());
    let (msg, env) = if registry {
        let image = import::open_image(&plan).await.map_err(failed)?;
        let env = kubevirt_env(image.env());
        let (disk, layer) = (plan.disk, plan.registry.layer);
        let msg = blocking(move || write_image(&disk, image.as_ref(), &layer, progress))
            .await
            .map_err(failed)?;
        (msg, env)
    } else {
        let msg = import::run(plan, progress)
            .await
            .map_err(failed)?
            .unwrap_or_default();
        (msg, Vec::new())
    };
    Ok(Spooled {
        disk: data.join("disk.img"),
        _dir: dir,
        origin: Origin::from(&msg.import_info.unwrap_or_default()),
        env,
    })
}

/// How the push's source is reached. A source registry is read with the push's
/// credentials and CA dir (an auth file can hold both registries'); a URL source gets
/// no credentials, which are the destination's and not for an HTTP server.
fn source_net(cfg: &PushConfig, registry: bool) -> Net {
    let a = &cfg.access;
    Net {
        credentials: a.credentials.clone().filter(|_| registry),
        auth_file: a.auth_file.clone().filter(|_| registry),
        ca_dirs: a.cert_dir.iter().cloned().collect(),
        insecure: a.insecure,
        proxies: a.proxies.clone(),
        extra_headers: Vec::new(),
        // An import's defaults (`--retries`, `--idle-timeout`).
        retries: 8,
        refuse_internal_redirects: false,
        idle_timeout: std::time::Duration::from_secs(600),
    }
}

/// The image config's `KUBEVIRT_IO_` entries: they become PVC labels when CDI imports
/// the pushed image, so the push keeps them.
fn kubevirt_env(env: &[String]) -> Vec<String> {
    env.iter()
        .filter(|e| {
            e.split_once('=')
                .is_some_and(|(k, _)| k.contains("KUBEVIRT_IO_"))
        })
        .cloned()
        .collect()
}
