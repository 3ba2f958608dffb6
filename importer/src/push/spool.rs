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

use crate::cli::{ImportArgs, PushArgs};
use crate::disk::{blocking, write_image};
use crate::failure::Failure;
use crate::import::{self, Plan};
use clap::Parser;
use ferrydisk_common::progress::Progress;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// A push source that is a path to a file or block device (not a URL or image
/// reference).
pub fn is_path(source: &str) -> bool {
    crate::inspect::classify(source).0 == "http" && !source.contains("://")
}

/// The import's own argument parser, so that the source is read with everything an
/// import takes from its environment (credentials, CA dirs, proxies, platform).
#[derive(Parser)]
struct SpoolCli {
    #[command(flatten)]
    import: ImportArgs,
}

/// Imports `args.source` into a spool directory as `output_format` (raw or qcow2; a
/// qcow2 source with qcow2 output keeps its bytes).
pub async fn import(args: &PushArgs, output_format: &str) -> Result<Spooled, String> {
    import_into(args, output_format, None).await
}

/// [`import`], or with `stream` the disk written into that target as it is imported
/// (the spool directory then only holds the import's bookkeeping, no disk).
pub async fn import_into(
    args: &PushArgs,
    output_format: &str,
    stream: Option<crate::disk::StreamSink>,
) -> Result<Spooled, String> {
    let source = args.source.to_string_lossy().to_string();
    let (kind, endpoint) = crate::inspect::classify(&source);
    let base = args.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("ferrydisk-push-")
        .tempdir_in(&base)
        .map_err(|e| format!("spool directory in {}: {e}", base.display()))?;
    let data = dir.path().join("data");
    std::fs::create_dir(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    let p = |x: &Path| x.to_string_lossy().to_string();
    let argv = [
        "importer".to_string(),
        format!("--source={kind}"),
        format!("--endpoint={endpoint}"),
        format!("--data-dir={}", p(&data)),
        format!("--scratch={}", p(&dir.path().join("scratch"))),
        format!(
            "--termination-log={}",
            p(&dir.path().join("termination-log"))
        ),
        format!("--output-format={output_format}"),
        "--content-type=kubevirt".to_string(),
        "--allow-local-files".to_string(),
        format!("--insecure-tls={}", args.insecure_tls),
    ];
    let mut a = SpoolCli::try_parse_from(argv)
        .map_err(|e| format!("reading {source}: {}", e.to_string().trim()))?
        .import;
    // A source registry is read with the push's credentials and CA dir (an auth file
    // can hold both registries'); a URL source gets no credentials, which are the
    // destination's and not for an HTTP server.
    let registry = kind == "registry";
    a.access_key_id = args.access_key_id.clone().filter(|_| registry);
    a.secret_key = args.secret_key.clone().filter(|_| registry);
    a.auth_file = args.auth_file.clone().filter(|_| registry);
    if args.cert_dir.is_some() {
        a.cert_dir = args.cert_dir.clone();
    }
    // The spool is sized by what the source holds, not by a volume request.
    a.image_size = String::new();
    a.preallocation = None;
    a.volume.filesystem_overhead = "0".into();
    if stream.is_some() {
        tracing::info!(source = %crate::sources::redact::url(&endpoint), "streaming the import into the upload");
    } else {
        tracing::info!(
            source = %crate::sources::redact::url(&endpoint),
            spool = %dir.path().display(),
            output_format,
            "spooling the import before pushing: a tar layer needs the disk's size and the registry check its digest before any byte goes up"
        );
    }
    let failed = |f: Failure| {
        format!(
            "reading {source}: {}",
            ferrydisk_common::error::one_line(&f.message())
        )
    };
    let progress = Arc::new(Progress::default());
    let mut plan = Plan::new(a).map_err(failed)?;
    if let Some(s) = stream {
        plan.disk.stream = Some(std::sync::Mutex::new(Some(s)));
    }
    let (msg, env) = if kind == "registry" {
        let image = import::open_image(&plan.args).await.map_err(failed)?;
        let env: Vec<String> = image
            .env()
            .iter()
            .filter(|e| {
                e.split_once('=')
                    .is_some_and(|(k, _)| k.contains("KUBEVIRT_IO_"))
            })
            .cloned()
            .collect();
        let layer = plan.args.layer_selector().map_err(|e| e.to_string())?;
        let msg = blocking(move || write_image(&plan.disk, image.as_ref(), &layer, progress))
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
