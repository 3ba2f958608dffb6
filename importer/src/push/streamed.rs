//! Pushing while importing, with no spool: a disk converted to raw
//! (`--convert raw`) goes up as the import decodes it, as an OCI artifact's blob
//! (KubeVirt's `application/vnd.kubevirt.disk.raw`, `+zstd` with `--zstd`) or as a
//! containerDisk's tar layer. The import writes into a [`StreamTarget`]: the disk in
//! guest order, holes as zeros, through zstd and the digest into the registry's
//! upload, whose length and digest are known only at the end. Raw sources (also
//! compressed) are in guest order; a converted format usually is, and when it is not
//! (a write going back), the upload is dropped and the push spools instead, saying so.
//!
//! A containerDisk's tar entry needs the disk's size in its header, before the first
//! byte: a format announces its virtual size before its data (qcow2, vmdk, vhd, vhdx,
//! vdi), so those stream; a raw source's length is known only at its end, so a raw
//! source pushed as a containerDisk spools.
//!
//! What this gives up against a spooled push: the `HEAD` check before the upload (the
//! digest is not known until the last byte), so a blob the registry has is sent again
//! (the registry then keeps one copy).

use super::layer::{BlobWriter, LayerSpec, Layout, Produced};
use super::{connect, put_image, spool, summary, Chunks, Dest, Source, Summary, PIECE};
use crate::cli::PushArgs;
use bytes::Bytes;
use ferrydisk_common::sink::stream::{StreamOut, StreamTarget};
use ferrydisk_common::sniff::Format;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Whether this push can stream (to a registry): a disk converted to raw. A local
/// file kept as stored is never converted, and streams from the file already.
pub(super) fn applies(args: &PushArgs) -> bool {
    args.convert == "raw"
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

/// Streams the push; `Ok(None)` when the source turned out not to be in guest order
/// (the caller spools instead).
pub(super) async fn push(args: &PushArgs, dest: &Dest) -> Result<Option<Summary>, String> {
    let limit = ferrydisk_common::cdi::space::parse_quantity(&args.max_size)
        .map_err(|e| format!("--max-size {:?}: {e}", args.max_size))?;
    let reg = connect(args, dest).await?;
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
    let target = StreamTarget::new(Box::new(out), &shown, backwards.clone());
    tracing::info!(dest = %shown, max_size = limit, "pushing as the import decodes: no spool");
    let (uploaded, imported) = tokio::join!(
        reg.upload(rx, drx, None, chunk.is_some()),
        spool::import_into(args, "raw", Some((Box::new(target), limit)))
    );
    let spooled = match imported {
        Ok(s) => s,
        Err(e) if e.contains(NO_LENGTH) => {
            tracing::info!("the source is raw, whose length is known only at its end, and {NO_LENGTH}: the upload is dropped and the push spools instead");
            return Ok(None);
        }
        Err(e) if backwards.load(Ordering::Relaxed) || e.contains(crate::disk::STREAM_RESTART) => {
            tracing::info!("the source's data is not in guest order: the upload is dropped and the push spools instead");
            return Ok(None);
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
    let media = super::media_type(&spec, Format::Raw)?;
    let src = Source {
        // Nothing local: the disk went up as it was decoded.
        file: Arc::new(tempfile::tempfile().map_err(|e| format!("temp file: {e}"))?),
        len: 0,
        shown: args.source.display().to_string(),
        format: Format::Raw,
        virtual_size: spooled.origin.virtual_size,
        spec,
        media,
        origin: spooled.origin.clone(),
    };
    let args = &super::with_source_env(args, &spooled.env);
    let manifest_digest = put_image(args, dest, &reg, &src, &pre).await?;
    let reference = format!("{}/{}:{}", dest.host, dest.repo, dest.tag);
    tracing::info!(%reference, digest = %manifest_digest, layer = %pre.digest, size = pre.size, "pushed as streamed");
    Ok(Some(summary(reference, manifest_digest, pre, true, &src)))
}
