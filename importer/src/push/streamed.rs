//! Pushing while importing, with no spool. The import writes into a
//! [`StreamTarget`]: the disk in guest order, holes as zeros, through zstd and the
//! digest into the registry's upload, whose length and digest are known only at the
//! end.
//!
//! One pass, when the layout is known before the data: a disk converted to raw
//! (`--convert raw`) as an OCI artifact's blob (KubeVirt's
//! `application/vnd.kubevirt.disk.raw`, `+zstd` with `--zstd`), or as a containerDisk's
//! tar layer when the format announces its virtual size before its data (qcow2, vmdk,
//! vhd, vhdx, vdi); the tar header needs the size before the first byte.
//!
//! Two passes, when it is not ([`measure`], then [`push`] with what it found): a raw
//! source (raw.xz, raw.gz: its length is known only at its end) as a containerDisk, a
//! qcow2 kept as it came from a compressed or remote source, and a disk converted to
//! qcow2 (the header, tables and refcounts come before the data they describe, and
//! depend on which clusters hold data: [`Qcow2Stream`]). The first pass runs the whole
//! import into a target that keeps only the length and a bitmap of clusters with data
//! (2 MiB per TiB); the second streams. The source is read twice, nothing is spooled.
//!
//! Data that is not in guest order (a qcow2 whose clusters were allocated in another
//! order) cannot be streamed: the upload is dropped and the push spools instead, saying
//! so; `--spool-dir` also makes the push spool rather than read the source twice.
//!
//! The digest is known only at the last byte, so a `HEAD` cannot come before the
//! upload. When the repository holds any tag (a push repeated, or the same disk under
//! a new tag), a digest-only pass runs first and the upload only if the registry lacks
//! that blob: a second pass over the source is cheaper than sending the layer again.
//! A push into an empty or new repository uploads at once.

use super::error::PushFailure;
use super::image;
use super::layer::{BlobWriter, LayerSpec, Layout, Produced};
use super::source::{self, Source};
use super::spool::{self, SpoolError};
use super::summary::{Route, SpoolReason, Summary};
use super::target::Dest;
use super::upload::{Chunks, PIECE};
use crate::cli::{Convert, OutputFormat};
use crate::config::PushConfig;
use crate::failure::Failure;
use crate::net::registry::Registry;
use bytes::Bytes;
use ferrydisk_common::sink::measure::{MeasureTarget, Measured};
use ferrydisk_common::sink::qcow2_stream::{self, Qcow2Stream};
use ferrydisk_common::sink::stream::{StreamOut, StreamTarget};
use ferrydisk_common::sniff::Format;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How a streamed push ended.
enum Streamed {
    Pushed(Box<Summary>),
    /// A one-pass containerDisk whose length the source did not say before its data.
    NoLength,
    /// The data did not come in guest order: only a spool takes it.
    OutOfOrder,
    /// A digest-only pass found a layer the registry does not have.
    NotThere,
}

/// Pushes `cfg`'s source into `dest` as it is imported: in one pass when the layout is
/// known before the data (a disk converted to raw), else in two (the first measures).
/// Why not, when the push must spool instead (data out of guest order, or
/// `--spool-dir`), with the passes already made over the source.
pub(super) async fn try_push(
    cfg: &PushConfig,
    dest: &Dest,
) -> Result<Result<Summary, (SpoolReason, u32)>, PushFailure> {
    let mut passes = 0;
    let mut reason = cfg
        .payload
        .spool_dir
        .is_some()
        .then_some(SpoolReason::SpoolDir);
    if cfg.payload.convert == Convert::Raw {
        match push(cfg, dest, None, &mut passes).await? {
            Streamed::Pushed(s) => return Ok(Ok(*s)),
            Streamed::OutOfOrder => reason = Some(SpoolReason::OutOfOrder),
            Streamed::NoLength | Streamed::NotThere => {}
        }
    }
    if let Some(r) = reason {
        return Ok(Err((r, passes)));
    }
    let output = super::plan::output(cfg);
    passes += 1;
    match measure(cfg, output).await? {
        Some(m) => match push(cfg, dest, Some((output, m)), &mut passes).await? {
            Streamed::Pushed(s) => Ok(Ok(*s)),
            Streamed::OutOfOrder | Streamed::NoLength | Streamed::NotThere => {
                Ok(Err((SpoolReason::OutOfOrder, passes)))
            }
        },
        None => {
            tracing::info!("the source's data is not in guest order: the push spools instead");
            Ok(Err((SpoolReason::OutOfOrder, passes)))
        }
    }
}

/// The first of two passes: the import, writing nothing, measures the disk `output`
/// would be. `None` when its data is not in guest order.
async fn measure(cfg: &PushConfig, output: OutputFormat) -> Result<Option<Measured>, PushFailure> {
    let found = std::sync::Arc::new(Mutex::new(None));
    let target = MeasureTarget::new(found.clone(), "the measuring pass");
    tracing::info!(?output, "reading the source twice, with no spool: this pass measures the disk (a containerDisk's tar header needs its size, a qcow2 its tables, before the data); --spool-dir spools instead");
    spool::import_into(cfg, output, Some((Box::new(target), cfg.payload.max_size))).await?;
    let m = found
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or(PushFailure::NotMeasured)?;
    tracing::info!(
        len = m.len,
        clusters_with_data = m.clusters.total(),
        in_order = m.in_order,
        kept_as_is = m.verbatim,
        "measured"
    );
    Ok(m.in_order.then_some(m))
}

/// Why a containerDisk stream did not begin: the disk's length was not known before
/// its first byte.
#[derive(Debug, thiserror::Error)]
#[error("a containerDisk's tar header needs the disk's size before its data")]
struct NoLength;

struct UploadOut {
    blob: Option<BlobWriter<Chunks>>,
    digest: Option<tokio::sync::oneshot::Sender<Option<String>>>,
    produced: Arc<Mutex<Option<Produced>>>,
    /// A containerDisk: the disk's name, and its length once the stream began.
    tar: Option<(String, Option<u64>)>,
    /// Set when the stream could not begin for want of a length.
    no_length: Arc<AtomicBool>,
}

impl UploadOut {
    fn no_length(&self) -> io::Error {
        self.no_length.store(true, Ordering::Relaxed);
        io::Error::other(NoLength)
    }
}

impl Write for UploadOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.blob {
            Some(w) => w.write(buf),
            None => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the upload is closed",
            )),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl StreamOut for UploadOut {
    fn begin(&mut self, len: Option<u64>) -> io::Result<()> {
        let Some((name, _)) = &self.tar else {
            return Ok(());
        };
        let Some(len) = len else {
            return Err(self.no_length());
        };
        let prefix = super::layer::tar_prefix(name, len)?;
        if let Some((_, begun)) = &mut self.tar {
            *begun = Some(len);
        }
        self.write_all(&prefix)
    }

    fn close(mut self: Box<Self>) -> io::Result<()> {
        if let Some((_, len)) = self.tar {
            let Some(len) = len else {
                return Err(self.no_length());
            };
            self.write_all(&super::layer::tar_suffix(len))?;
        }
        let blob = self
            .blob
            .take()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "closed twice"))?;
        let (mut out, p) = blob.finish()?;
        out.send()?;
        drop(out);
        if let Some(d) = self.digest.take() {
            let _ = d.send(Some(p.digest.clone()));
        }
        *self.produced.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        Ok(())
    }
}

/// Streams the push: in one pass (`measured` is `None`: raw output), or as the second
/// of two, `measured` saying what the disk `output` will be.
///
/// When the repository has tags already (a push repeated, or another tag of it), the
/// layer is first produced only to learn its digest: if the registry has that blob,
/// nothing is uploaded; if not, the import runs once more into the upload.
async fn push(
    cfg: &PushConfig,
    dest: &Dest,
    measured: Option<(OutputFormat, Measured)>,
    passes: &mut u32,
) -> Result<Streamed, PushFailure> {
    let reg = super::connect::connect(&cfg.access, cfg.transfer.idle, dest).await?;
    let measured = measured.as_ref().map(|(o, m)| (*o, m));
    let tag_exists = reg.manifest_exists(&dest.tag).await?;
    let repo_has_tags = tag_exists || reg.has_tags().await?;
    if repo_has_tags {
        tracing::info!(tag = %dest.tag, tag_exists, "the repository has tags: computing the layer's digest first, so that a layer the registry has is not sent again");
        *passes += 1;
        match once(cfg, dest, &reg, measured, true).await? {
            Streamed::Pushed(mut s) => {
                s.passes = *passes;
                s.digest_first = true;
                return Ok(Streamed::Pushed(s));
            }
            Streamed::NotThere => {
                tracing::info!(
                    "the registry does not have this layer: importing again into the upload"
                )
            }
            done => return Ok(done),
        }
    }
    *passes += 1;
    Ok(match once(cfg, dest, &reg, measured, false).await? {
        Streamed::Pushed(mut s) => {
            s.passes = *passes;
            s.digest_first = repo_has_tags;
            Streamed::Pushed(s)
        }
        other => other,
    })
}

/// What goes out: the disk as it is imported (raw, or a qcow2 kept as it came), or
/// qcow2 laid out from the measured clusters.
fn output_stream(
    out: UploadOut,
    measured: Option<(OutputFormat, &Measured)>,
) -> Result<(OutputFormat, Format, Box<dyn StreamOut>), PushFailure> {
    Ok(match measured {
        None => (OutputFormat::Raw, Format::Raw, Box::new(out)),
        Some((OutputFormat::Qcow2, m)) if !m.verbatim => {
            let layout = qcow2_stream::Layout::new(m.len, &m.clusters)
                .map_err(|e| PushFailure::Qcow2Layout(e.to_string()))?;
            tracing::info!(
                virtual_size = m.len,
                qcow2_size = layout.len(),
                "streaming qcow2: header and tables first, then the data clusters in guest order"
            );
            let q = Qcow2Stream::new(Box::new(out), layout, m.clusters.clone());
            (OutputFormat::Qcow2, Format::Qcow2, Box::new(q))
        }
        Some((OutputFormat::Qcow2, _)) => (OutputFormat::Qcow2, Format::Qcow2, Box::new(out)),
        Some((OutputFormat::Raw, _)) => (OutputFormat::Raw, Format::Raw, Box::new(out)),
    })
}

/// The upload a streamed import writes into: the target the import writes, the
/// pieces and digest the registry upload reads, and what tells why a stream stopped.
struct Wired {
    target: StreamTarget,
    output: OutputFormat,
    format: Format,
    spec: LayerSpec,
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    digest: tokio::sync::oneshot::Receiver<Option<String>>,
    produced: Arc<Mutex<Option<Produced>>>,
    /// The containerDisk stream found no length before its data.
    no_length: Arc<AtomicBool>,
    /// The data came out of guest order.
    backwards: Arc<AtomicBool>,
    /// The upload stopped taking pieces (its own error is the cause).
    upload_stopped: Arc<AtomicBool>,
}

fn wire(
    cfg: &PushConfig,
    dest: &Dest,
    measured: Option<(OutputFormat, &Measured)>,
) -> Result<Wired, PushFailure> {
    let spec = source::layer_spec(&cfg.payload);
    let chunk = cfg.transfer.chunk;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(if chunk.is_some() { 1 } else { 4 });
    let (dtx, digest) = tokio::sync::oneshot::channel();
    let chunks = Chunks::new(tx, chunk.unwrap_or(PIECE));
    let upload_stopped = chunks.closed.clone();
    let blob = BlobWriter::new(chunks, spec.zstd)?;
    let produced = Arc::new(Mutex::new(None));
    let no_length = Arc::new(AtomicBool::new(false));
    let out = UploadOut {
        blob: Some(blob),
        digest: Some(dtx),
        produced: produced.clone(),
        tar: (spec.layout == Layout::ContainerDisk).then(|| (spec.disk_name.clone(), None)),
        no_length: no_length.clone(),
    };
    let backwards = Arc::new(AtomicBool::new(false));
    let shown = format!("the upload to {}/{}", dest.host, dest.repo);
    let (output, format, out) = output_stream(out, measured)?;
    let mut target = StreamTarget::new(out, &shown, backwards.clone());
    if let Some((_, m)) = measured {
        target = target.with_len(m.len);
    }
    tracing::info!(dest = %shown, max_size = cfg.payload.max_size, "pushing as the import decodes: no spool");
    Ok(Wired {
        target,
        output,
        format,
        spec,
        rx,
        digest,
        produced,
        no_length,
        backwards,
        upload_stopped,
    })
}

/// One import into the upload, or with `digest_only` into nothing but the digest (and
/// then the image is tagged only if the registry has the layer).
async fn once(
    cfg: &PushConfig,
    dest: &Dest,
    reg: &Registry,
    measured: Option<(OutputFormat, &Measured)>,
    digest_only: bool,
) -> Result<Streamed, PushFailure> {
    let w = wire(cfg, dest, measured)?;
    let chunked = cfg.transfer.chunk.is_some();
    let (rx, digest) = (w.rx, w.digest);
    let upload = async {
        if digest_only {
            let mut rx = rx;
            while rx.recv().await.is_some() {}
            drop(digest);
            Ok(())
        } else {
            reg.upload(rx, digest, None, chunked).await
        }
    };
    let limit = cfg.payload.max_size;
    let (uploaded, imported) = tokio::join!(
        upload,
        spool::import_into(cfg, w.output, Some((Box::new(w.target), limit)))
    );
    let spooled = match imported {
        Ok(s) => s,
        Err(_) if w.no_length.load(Ordering::Relaxed) => {
            tracing::info!("the source is raw, whose length is known only at its end, and {NoLength}: the upload is dropped");
            return Ok(Streamed::NoLength);
        }
        Err(SpoolError::Import {
            failure: Failure::StreamTaken,
            ..
        }) => {
            tracing::info!("the source writes the disk twice (an overlay chain): the upload is dropped and the push spools instead");
            return Ok(Streamed::OutOfOrder);
        }
        Err(_) if w.backwards.load(Ordering::Relaxed) => {
            tracing::info!("the source's data is not in guest order: the upload is dropped and the push spools instead");
            return Ok(Streamed::OutOfOrder);
        }
        // A failed upload stops the import; its own error says why.
        Err(e) => {
            return Err(match uploaded {
                Err(u) if w.upload_stopped.load(Ordering::Relaxed) => u.into(),
                _ => e.into(),
            })
        }
    };
    uploaded?;
    let pre = w
        .produced
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or(PushFailure::NoDigest)?;
    if digest_only {
        if !reg.blob_exists(&pre.digest, pre.size).await? {
            return Ok(Streamed::NotThere);
        }
        tracing::info!(digest = %pre.digest, "the registry has this layer; not uploading it");
    }
    let src = Source {
        // Nothing local: the disk went up as it was decoded.
        file: Arc::new(tempfile::tempfile()?),
        len: 0,
        shown: cfg.source.display().to_string(),
        format: w.format,
        virtual_size: spooled.origin.virtual_size,
        media: source::media_type(&w.spec, w.format)?,
        spec: w.spec,
        origin: spooled.origin.clone(),
    };
    let image = image::with_source_env(&cfg.image, &spooled.env);
    let manifest_digest = image::publish(&image, dest, reg, &src, &pre).await?;
    let reference = dest.reference();
    tracing::info!(%reference, digest = %manifest_digest, layer = %pre.digest, size = pre.size, uploaded = !digest_only, "pushed as streamed");
    let mut s = Summary::new(reference, manifest_digest, pre, &src);
    s.layer_uploaded = !digest_only;
    s.route = Route::Streamed;
    Ok(Streamed::Pushed(Box::new(s)))
}
