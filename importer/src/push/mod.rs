//! `importer push`: a local disk file or volume into a registry, as a containerDisk (a
//! tar layer holding `disk/<name>`, uid/gid 107) or as an OCI artifact whose one layer
//! blob is the disk (KubeVirt's `application/vnd.kubevirt.disk.*` media types). The
//! payload goes up as it is stored (raw or qcow2 stays what it is).
//!
//! It streams: the layer is produced in one forward pass (holes of a sparse file are
//! not read, only counted as zeros) and goes up as one streamed PATCH of 1 MiB pieces
//! (or `--chunk-mib` PATCHes with `Content-Range`) while its digest is computed. A blob
//! the registry already has is not sent again: a first pass computes the layer's digest
//! without uploading (reading the source once more, never storing it), then `HEAD`
//! decides.
//!
//! The stages, in order, one file each: [`plan`] (how the payload is made), [`source`]
//! (the disk opened and described; [`layer`] produces the bytes), [`upload`] (the
//! layer blob into the registry), [`image`] (configs, manifests, index, tag).
//! [`streamed`] runs the same stages while an import decodes, [`spool`] imports into
//! a file first, [`save`] writes a local layout or archive, [`vm`] a whole VM.

pub mod connect;
pub mod error;
pub mod image;
pub mod kubevirt;
pub mod layer;
pub mod plan;
pub mod save;
pub mod source;
pub mod spool;
mod streamed;
mod summary;
pub mod target;
pub mod upload;
mod vm;

use crate::config::push::Target;
use crate::config::PushConfig;
use error::PushFailure;
use source::Source;
pub use summary::Summary;
use summary::{Route, SpoolReason};
use target::Dest;
use upload::Sent;

/// `importer push`: prints the summary as one JSON line, or the failure in one line.
pub async fn run(args: crate::cli::PushArgs) -> i32 {
    let pushed = match PushConfig::from_args(args) {
        Err(e) => Err(PushFailure::from(e)),
        Ok(cfg) if cfg.disks.is_empty() => push(&cfg, None)
            .await
            .map(|s| serde_json::to_string(&s).expect("json")),
        Ok(cfg) => vm::push(&cfg)
            .await
            .map(|s| serde_json::to_string(&s).expect("json")),
    };
    match pushed {
        Ok(s) => {
            println!("{s}");
            0
        }
        Err(e) => {
            tracing::error!("push failed: {e}");
            eprintln!("push failed: {e}");
            1
        }
    }
}

/// One disk into the registry or a local layout; `given`: what the upload server
/// received, when it pushes the volume it wrote (the labels describe that).
pub async fn push(cfg: &PushConfig, given: Option<spool::Origin>) -> Result<Summary, PushFailure> {
    let as_stored = plan::as_stored(cfg);
    // Into a registry, anything but a local file as stored goes up as it is imported
    // where the data allows it (`streamed`); the rest is imported into a spool first.
    let mut spooling = (SpoolReason::LocalTarget, 0);
    if let (Some(dest), false) = (cfg.registry(), as_stored) {
        match streamed::try_push(cfg, dest).await? {
            Ok(s) => return Ok(s),
            Err(why) => spooling = why,
        }
    }
    let spooled = if as_stored {
        None
    } else {
        Some(spool::import(cfg, plan::output(cfg)).await?)
    };
    let env = spooled.as_ref().map_or(&[][..], |s| &s.env[..]);
    let image = image::with_source_env(&cfg.image, env);
    let src = source::open(cfg, spooled.as_ref(), given)?;
    // (the spool, if any, is removed when `spooled` drops, after the push)
    let mut s = match &cfg.target {
        Target::Registry(dest) => to_registry(cfg, &image, dest, src).await?,
        Target::Local(local) => {
            let local = local.clone();
            tokio::task::spawn_blocking(move || save::save(&image, &local, src))
                .await
                .map_err(std::io::Error::other)??
        }
    };
    if spooled.is_some() {
        // The spool's own reads are not the source's.
        s.route = Route::Spooled;
        s.spool_reason = Some(spooling.0);
        s.passes = spooling.1 + 1;
    }
    Ok(s)
}

/// A local disk into a registry: the layer's digest first (a blob the registry has is
/// not sent again), the layer, then the image around it.
async fn to_registry(
    cfg: &PushConfig,
    image: &crate::config::push::ImageSettings,
    dest: &Dest,
    src: Source,
) -> Result<Summary, PushFailure> {
    let reg = connect::connect(&cfg.access, cfg.transfer.idle, dest).await?;
    // Pass one: the digest, so a blob the registry has is not sent again.
    let pre = {
        let (f, s, len) = (src.file.clone(), src.spec.clone(), src.len);
        tokio::task::spawn_blocking(move || {
            layer::produce(
                &mut source::SkipHoles::new(&f, len),
                len,
                &s,
                std::io::sink(),
            )
            .map(|(_, p)| p)
        })
        .await
        .map_err(std::io::Error::other)?
        .map_err(|e| PushFailure::Source {
            what: "reading",
            shown: src.shown.clone(),
            source: e,
        })?
    };
    let sent = upload::send(&cfg.transfer, &reg, &src, &pre).await?;
    let manifest_digest = image::publish(image, dest, &reg, &src, &pre).await?;
    let reference = dest.reference();
    tracing::info!(%reference, digest = %manifest_digest, layer = %pre.digest, ?sent, platforms = image.platforms.len(), "pushed");
    let mut s = Summary::new(reference, manifest_digest, pre, &src);
    s.layer_uploaded = sent == Sent::Uploaded;
    s.layer_mounted = sent == Sent::Mounted;
    s.digest_first = true;
    s.passes = 1 + u32::from(s.layer_uploaded);
    Ok(s)
}
