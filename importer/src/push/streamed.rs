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

use super::layer::{BlobWriter, LayerSpec, Layout, Produced};
use super::{connect, put_image, spool, summary, Chunks, Dest, Source, Summary, PIECE};
use crate::cli::PushArgs;
use bytes::Bytes;
use ferrydisk_common::sink::measure::{MeasureTarget, Measured};
use ferrydisk_common::sink::qcow2_stream::{self, Qcow2Stream};
use ferrydisk_common::sink::stream::{StreamOut, StreamTarget};
use ferrydisk_common::sniff::Format;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Whether this push can stream in one pass (to a registry): a disk converted to raw.
/// A local file kept as stored is never converted, and streams from the file already.
pub(super) fn applies(args: &PushArgs) -> bool {
    args.convert == "raw"
}

/// How a streamed push ended.
pub(super) enum Streamed {
    Pushed(Box<Summary>),
    /// A one-pass containerDisk whose length the source did not say before its data.
    NoLength,
    /// The data did not come in guest order: only a spool takes it.
    OutOfOrder,
    /// A digest-only pass found a layer the registry does not have.
    NotThere,
}

/// The first of two passes: the import, writing nothing, measures the disk `output`
/// (`raw` or `qcow2`) would be. `None` when its data is not in guest order.
pub(super) async fn measure(args: &PushArgs, output: &str) -> Result<Option<Measured>, String> {
    let limit = max_size(args)?;
    let found = std::sync::Arc::new(Mutex::new(None));
    let target = MeasureTarget::new(found.clone(), "the measuring pass");
    tracing::info!(output, "reading the source twice, with no spool: this pass measures the disk (a containerDisk's tar header needs its size, a qcow2 its tables, before the data); --spool-dir spools instead");
    spool::import_into(args, output, Some((Box::new(target), limit))).await?;
    let m = found
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or("the measuring pass ended without a result")?;
    tracing::info!(
        len = m.len,
        clusters_with_data = m.clusters.total(),
        in_order = m.in_order,
        kept_as_is = m.verbatim,
        "measured"
    );
    Ok(m.in_order.then_some(m))
}

fn max_size(args: &PushArgs) -> Result<u64, String> {
    ferrydisk_common::cdi::space::parse_quantity(&args.max_size)
        .map_err(|e| format!("--max-size {:?}: {e}", args.max_size))
}

/// Why a containerDisk stream did not begin: the disk's length was not known before
/// its first byte.
const NO_LENGTH: &str = "a containerDisk's tar header needs the disk's size before its data";

struct UploadOut {
    blob: Option<BlobWriter<Chunks>>,
    digest: Option<tokio::sync::oneshot::Sender<Option<String>>>,
    produced: Arc<Mutex<Option<Produced>>>,
    /// A containerDisk: the disk's name, and its length once the stream began.
    tar: Option<(String, Option<u64>)>,
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
        let Some((name, begun)) = &mut self.tar else {
            return Ok(());
        };
        let len = len.ok_or_else(|| io::Error::other(NO_LENGTH))?;
        *begun = Some(len);
        let prefix = super::layer::tar_prefix(name, len)?;
        self.write_all(&prefix)
    }

    fn close(mut self: Box<Self>) -> io::Result<()> {
        if let Some((_, len)) = self.tar {
            let len = len.ok_or_else(|| io::Error::other(NO_LENGTH))?;
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
/// of two, `measured` saying what the disk `output` is (`raw` or `qcow2`) will be.
///
/// When the repository has tags already (a push repeated, or another tag of it), the
/// layer is first produced only to learn its digest: if the registry has that blob,
/// nothing is uploaded; if not, the import runs once more into the upload.
pub(super) async fn push(
    args: &PushArgs,
    dest: &Dest,
    measured: Option<(&str, Measured)>,
) -> Result<Streamed, String> {
    let reg = connect(args, dest).await?;
    let measured = measured.as_ref().map(|(o, m)| (*o, m));
    let tag_exists = reg
        .manifest_exists(&dest.tag)
        .await
        .map_err(|e| super::chain(&e))?;
    let repo_has_tags = tag_exists || reg.has_tags().await.map_err(|e| super::chain(&e))?;
    if repo_has_tags {
        tracing::info!(tag = %dest.tag, tag_exists, "the repository has tags: computing the layer's digest first, so that a layer the registry has is not sent again");
        match once(args, dest, &reg, measured, true).await? {
            Streamed::NotThere => {
                tracing::info!(
                    "the registry does not have this layer: importing again into the upload"
                )
            }
            done => return Ok(done),
        }
    }
    once(args, dest, &reg, measured, false).await
}

/// One import into the upload, or with `digest_only` into nothing but the digest (and
/// then the image is tagged only if the registry has the layer).
async fn once(
    args: &PushArgs,
    dest: &Dest,
    reg: &crate::net::registry::Registry,
    measured: Option<(&str, &Measured)>,
    digest_only: bool,
) -> Result<Streamed, String> {
    let limit = max_size(args)?;
    let spec = LayerSpec {
        layout: args.layout,
        disk_name: args.disk_name.clone(),
        zstd: args
            .zstd
            .then_some((args.zstd_level, super::zstd_threads())),
    };
    let chunk = args.chunk_mib.map(|m| (m as usize) << 20);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(if chunk.is_some() { 1 } else { 4 });
    let (dtx, drx) = tokio::sync::oneshot::channel();
    let chunks = Chunks {
        buf: Vec::new(),
        piece: chunk.unwrap_or(PIECE),
        tx,
        skip: 0,
    };
    let blob = BlobWriter::new(chunks, spec.zstd).map_err(|e| format!("zstd: {e}"))?;
    let produced = Arc::new(Mutex::new(None));
    let out = UploadOut {
        blob: Some(blob),
        digest: Some(dtx),
        produced: produced.clone(),
        tar: (spec.layout == Layout::ContainerDisk).then(|| (spec.disk_name.clone(), None)),
    };
    let backwards = Arc::new(AtomicBool::new(false));
    let shown = format!("the upload to {}/{}", dest.host, dest.repo);
    // What goes out: the disk as it is imported (raw, or a qcow2 kept as it came), or
    // qcow2 laid out from the measured clusters.
    let (output, format, out): (&str, Format, Box<dyn StreamOut>) = match measured {
        None => ("raw", Format::Raw, Box::new(out)),
        Some(("qcow2", m)) if !m.verbatim => {
            let layout = qcow2_stream::Layout::new(m.len, &m.clusters)
                .map_err(|e| format!("laying out the qcow2: {e}"))?;
            tracing::info!(
                virtual_size = m.len,
                qcow2_size = layout.len(),
                "streaming qcow2: header and tables first, then the data clusters in guest order"
            );
            let q = Qcow2Stream::new(Box::new(out), layout, m.clusters.clone());
            ("qcow2", Format::Qcow2, Box::new(q))
        }
        Some(("qcow2", _)) => ("qcow2", Format::Qcow2, Box::new(out)),
        Some((o, _)) => (o, Format::Raw, Box::new(out)),
    };
    let mut target = StreamTarget::new(out, &shown, backwards.clone());
    if let Some((_, m)) = measured {
        target = target.with_len(m.len);
    }
    tracing::info!(dest = %shown, max_size = limit, "pushing as the import decodes: no spool");
    let upload = async {
        if digest_only {
            let mut rx = rx;
            while rx.recv().await.is_some() {}
            drop(drx);
            Ok(())
        } else {
            reg.upload(rx, drx, None, chunk.is_some()).await
        }
    };
    let (uploaded, imported) = tokio::join!(
        upload,
        spool::import_into(args, output, Some((Box::new(target), limit)))
    );
    let spooled = match imported {
        Ok(s) => s,
        Err(e) if e.contains(NO_LENGTH) => {
            tracing::info!("the source is raw, whose length is known only at its end, and {NO_LENGTH}: the upload is dropped");
            return Ok(Streamed::NoLength);
        }
        Err(e) if backwards.load(Ordering::Relaxed) || e.contains(crate::disk::STREAM_RESTART) => {
            tracing::info!("the source's data is not in guest order: the upload is dropped and the push spools instead");
            return Ok(Streamed::OutOfOrder);
        }
        // A failed upload stops the import ("the upload stopped"); its own error says why.
        Err(e) => {
            return Err(match uploaded {
                Err(u) if e.contains("the upload stopped") => super::chain(&u),
                _ => e,
            })
        }
    };
    uploaded.map_err(|e| super::chain(&e))?;
    let pre = produced
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or("the stream ended without its digest")?;
    if digest_only {
        if !reg
            .blob_exists(&pre.digest, pre.size)
            .await
            .map_err(|e| super::chain(&e))?
        {
            return Ok(Streamed::NotThere);
        }
        tracing::info!(digest = %pre.digest, "the registry has this layer; not uploading it");
    }
    let media = super::media_type(&spec, format)?;
    let src = Source {
        // Nothing local: the disk went up as it was decoded.
        file: Arc::new(tempfile::tempfile().map_err(|e| format!("temp file: {e}"))?),
        len: 0,
        shown: args.source.display().to_string(),
        format,
        virtual_size: spooled.origin.virtual_size,
        spec,
        media,
        origin: spooled.origin.clone(),
    };
    let args = &super::with_source_env(args, &spooled.env);
    let manifest_digest = put_image(args, dest, reg, &src, &pre).await?;
    let reference = format!("{}/{}:{}", dest.host, dest.repo, dest.tag);
    tracing::info!(%reference, digest = %manifest_digest, layer = %pre.digest, size = pre.size, uploaded = !digest_only, "pushed as streamed");
    Ok(Streamed::Pushed(Box::new(summary(
        reference,
        manifest_digest,
        pre,
        !digest_only,
        &src,
    ))))
}
