//! The data path: peel compression and tar layers (detected by content, nestable), then
//! hand the disk format's bytes to the writer. Runs on a blocking thread.

use crate::cdi::space::{check_fits, TooLarge};
use crate::decode::containerdisk::{DiskError, DiskFinder};
use crate::decode::{self, gzip::Integrity, tar::TarError, PeekReader};
use crate::error::{find_in_chain, io_kind, ErrorKind, SourceError};
use crate::format::contract::StreamOptions;
use crate::format::{self, qcow2, vhd, FormatError, ImageInfo};
use crate::progress::Progress;
use crate::sink::discard::DiscardTarget;
use crate::sink::sparse::{CopyError, SparseWriter, WriterOptions};
use crate::sink::SinkError;
use crate::sniff::{sniff, Format, SNIFF_LEN};
use crate::stream::CountingReader;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

/// More nesting than this (a gzip of a tar of an xz of ...) is refused: real images have
/// one or two layers, and each layer costs a decoder's memory.
pub const MAX_LAYERS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("reading source: {0}")]
    Read(#[source] io::Error),
    #[error("{format} stream is corrupt: {source}")]
    Corrupt {
        format: Format,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tar(#[from] TarError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Format(FormatError),
    #[error("{0} data is not supported here (a disk image may be raw, qcow2, vmdk, vhd, vhdx or vdi, optionally compressed or in a tar)")]
    Unsupported(Format),
    #[error("archive content must be a tar archive, found {0}")]
    NotAnArchive(Format),
    #[error("more than {MAX_LAYERS} nested compression/archive layers")]
    TooDeep,
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
}

impl PipelineError {
    /// Each error knows its kind; a read error is the source's when it carries one.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PipelineError::Read(e) => io_kind(e).unwrap_or(ErrorKind::Io),
            PipelineError::Corrupt { source, .. } => {
                io_kind(source).unwrap_or(ErrorKind::CorruptImage)
            }
            PipelineError::NotAnArchive(_) | PipelineError::TooDeep => ErrorKind::CorruptImage,
            PipelineError::Unsupported(_) => ErrorKind::UnsupportedFormat,
            PipelineError::Tar(e) => e.kind(),
            PipelineError::Sink(e) => e.kind(),
            PipelineError::Disk(e) => e.kind(),
            PipelineError::Format(e) => e.kind(),
            PipelineError::TooLarge(e) => e.kind(),
        }
    }

    /// The source failure this error carries, if the source is what failed.
    pub fn source_error(&self) -> Option<&SourceError> {
        find_in_chain::<SourceError>(self)
    }
}

/// What was found and written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Layers peeled, outermost first (e.g. `[Gzip, Tar]`).
    pub layers: Vec<Format>,
    /// The disk format under the layers.
    pub format: Option<Format>,
    pub virtual_size: u64,
    pub tar_entry: Option<String>,
    /// Set when the image was kept in its own format (a qcow2 with `keep_qcow2`): the
    /// output file's length, which is not the virtual size.
    pub kept_len: Option<u64>,
}

impl Report {
    /// `gzip+tar+raw`, for logs.
    pub fn describe(&self) -> String {
        let mut parts: Vec<&str> = self.layers.iter().map(|f| f.name()).collect();
        if let Some(f) = self.format {
            parts.push(f.name());
        }
        parts.join("+")
    }
}

pub struct Options {
    /// The most bytes the image may occupy (available space of the volume).
    pub limit: u64,
    /// Length of the source stream if known (Content-Length); it is the virtual size
    /// when no layer sits on top of a raw image.
    pub source_len: Option<u64>,
    pub progress: Arc<Progress>,
    /// A scratch directory for formats that may need to spool (qcow2 with data ahead of
    /// its tables); `None` when no scratch volume is mounted.
    pub scratch: Option<std::path::PathBuf>,
    /// The source when it is a local file: a disk format found directly in it (no
    /// compression or tar around it) reads data that precedes its tables again from the
    /// file instead of holding or spooling it.
    pub source_file: Option<Arc<std::fs::File>>,
    /// Write a qcow2 image as qcow2 (validated by a full conversion that writes
    /// nothing) instead of converting it to raw. Only for file destinations.
    pub keep_qcow2: bool,
    /// What vouches for the source's bytes: a digest checked at its end lets gzip skip
    /// its CRC pass (see [`crate::decode::gzip`]).
    pub integrity: Integrity,
}

impl Options {
    /// What a format converter may use at this layer.
    fn stream_options(&self, report: &Report, known_len: Option<u64>) -> StreamOptions {
        StreamOptions {
            source_len: known_len,
            scratch: self.scratch.clone(),
            limit: self.limit,
            source_file: if report.layers.is_empty() && report.tar_entry.is_none() {
                self.source_file.clone()
            } else {
                None
            },
            ..Default::default()
        }
    }
}

/// Decodes `source` into `writer` (content type `kubevirt`).
pub fn write_disk(
    source: &mut dyn Read,
    writer: &mut SparseWriter,
    opts: &Options,
) -> Result<Report, PipelineError> {
    let mut report = Report::default();
    disk_layer(source, writer, opts, opts.source_len, &mut report)?;
    Ok(report)
}

fn disk_layer(
    r: &mut dyn Read,
    writer: &mut SparseWriter,
    opts: &Options,
    known_len: Option<u64>,
    report: &mut Report,
) -> Result<(), PipelineError> {
    let last = report.layers.last().copied();
    let mut peek = PeekReader::new(r, SNIFF_LEN).map_err(|e| read_error(e, last))?;
    let format = sniff(peek.head());
    if format.is_compression() {
        push_layer(report, format)?;
        if format == Format::Zstd {
            if let Some(size) = decode::compression::zstd_declared_size(peek.head()) {
                check_fits(size, opts.limit)?;
            }
        }
        let mut d = decode::decompressor(format, &mut peek, opts.integrity)
            .map_err(|e| read_error(e, Some(format)))?
            .ok_or(PipelineError::Unsupported(format))?;
        return disk_layer(&mut d, writer, opts, None, report);
    }
    match format {
        Format::Tar => {
            push_layer(report, format)?;
            decode::tar::with_single_file(&mut peek, |f| {
                check_fits(f.size, opts.limit)?;
                report.tar_entry = Some(f.name);
                disk_layer(f.reader, writer, opts, Some(f.size), report)
            })
        }
        Format::Raw => {
            report.format = Some(Format::Raw);
            if let Some(size) = known_len {
                check_fits(size, opts.limit)?;
                opts.progress.set_virtual_total(Some(size));
            }
            tracing::info!(format = %report.describe(), virtual_size = ?known_len, "detected image");
            let progress = opts.progress.clone();
            let mut counted = CountingReader::new(&mut peek, move |n| progress.add_decoded(n));
            // A fixed VHD is raw data with a footer in its last sector: held back and
            // dropped when it is one.
            let mut strip = vhd::FooterStrip::new(&mut counted);
            writer.copy_from(&mut strip).map_err(|e| match e {
                CopyError::Read(e) => read_error(e, last),
                CopyError::Sink(e) => PipelineError::Sink(e),
            })?;
            report.virtual_size = writer.position();
            if let Some(f) = strip.footer() {
                report.format = Some(Format::Vpc);
                report.virtual_size = f.virtual_size;
                opts.progress.set_virtual_total(Some(f.virtual_size));
                tracing::info!(
                    virtual_size = f.virtual_size,
                    "the raw image is a fixed vhd: its footer is not part of the disk"
                );
            }
            Ok(())
        }
        Format::Qcow2 if opts.keep_qcow2 => {
            report.format = Some(Format::Qcow2);
            keep_qcow2(&mut peek, writer, opts, report, last, known_len)
        }
        other => {
            report.format = Some(other);
            let convert = format::converter(other).ok_or(PipelineError::Unsupported(other))?;
            let progress = opts.progress.clone();
            let mut counted = CountingReader::new(&mut peek, move |n| progress.add_decoded(n));
            let sopts = opts.stream_options(report, known_len);
            let info = convert(&mut counted, writer, &sopts).map_err(|e| format_error(e, last))?;
            // What follows the last structure a converter needs (a dynamic vhd's footer
            // copy) is still part of the image: read here, it counts as the image's size.
            io::copy(&mut counted, &mut io::sink()).map_err(|e| read_error(e, last))?;
            finish_native(&info, opts, report);
            Ok(())
        }
    }
}

/// Copies a qcow2 verbatim to the destination while converting it into a discarding
/// writer: the conversion checks what a raw import would (hostile headers, every table,
/// every compressed cluster), and any failure fails the import as it would for raw.
fn keep_qcow2(
    r: &mut dyn Read,
    writer: &mut SparseWriter,
    opts: &Options,
    report: &mut Report,
    last: Option<Format>,
    known_len: Option<u64>,
) -> Result<(), PipelineError> {
    writer.keep_format()?;
    let progress = opts.progress.clone();
    let mut counted = CountingReader::new(r, move |n| progress.add_decoded(n));
    let mut tee = Tee {
        inner: &mut counted,
        out: writer,
        pos: 0,
        failed: None,
    };
    let mut check = SparseWriter::spawn(
        Box::new(DiscardTarget::default()),
        WriterOptions {
            limit: opts.limit,
            ..Default::default()
        },
    );
    let copts = opts.stream_options(report, known_len);
    let converted = qcow2::convert(&mut tee, &mut check, &copts).and_then(|h| {
        io::copy(&mut tee, &mut io::sink()).map_err(|source| FormatError::Read {
            format: Format::Qcow2,
            source,
        })?;
        Ok(h)
    });
    let converted = match (converted, tee.failed.take()) {
        (_, Some(e)) => Err(PipelineError::Sink(e)),
        (Ok(h), None) => Ok(h),
        (Err(e), None) => Err(format_error(e, last)),
    };
    let h = match converted {
        Ok(h) => {
            check.finish(0)?;
            h
        }
        Err(e) => {
            check.abort();
            return Err(e);
        }
    };
    let kept = tee.pos;
    tee.out.flush_pending()?;
    opts.progress.set_virtual_total(Some(h.virtual_size));
    report.virtual_size = h.virtual_size;
    report.kept_len = Some(kept);
    tracing::info!(format = %report.describe(), virtual_size = h.virtual_size, file_size = kept, "kept the qcow2 image as qcow2 (validated by a full conversion)");
    Ok(())
}

/// Passes a stream through while writing every byte, in order, to the destination.
struct Tee<'a> {
    inner: &'a mut dyn Read,
    out: &'a mut SparseWriter,
    pos: u64,
    failed: Option<SinkError>,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            if let Err(e) = self.out.write_at(self.pos, &buf[..n]) {
                self.failed = Some(e);
                return Err(io::Error::other("the destination failed"));
            }
            self.pos += n as u64;
        }
        Ok(n)
    }
}

fn finish_native(info: &ImageInfo, opts: &Options, report: &mut Report) {
    opts.progress.set_virtual_total(Some(info.virtual_size));
    report.virtual_size = info.virtual_size;
    tracing::info!(format = %report.describe(), subformat = info.subformat, virtual_size = info.virtual_size, "converted image");
}

/// A converter's read failure is the layer below's (a corrupt gzip, a dropped source).
pub fn format_error(e: FormatError, layer: Option<Format>) -> PipelineError {
    match e {
        FormatError::Read { source, .. } => read_error(source, layer),
        FormatError::Sink(e) => PipelineError::Sink(e),
        FormatError::TooLarge(e) => PipelineError::TooLarge(e),
        e => PipelineError::Format(e),
    }
}

/// One containerDisk layer (gzip, zstd or plain tar): if it holds the visible disk
/// (see [`DiskFinder`]), the disk is decoded into `writer` and its report returned. The
/// layer is always read to its end, so the caller's digest check covers every byte.
pub fn write_disk_from_layer(
    layer: &mut dyn Read,
    finder: &mut DiskFinder,
    writer: &mut SparseWriter,
    opts: &Options,
) -> Result<Option<Report>, PipelineError> {
    with_layer_tar(layer, opts.integrity, |reader| {
        finder.scan_layer(reader, |f| {
            check_fits(f.size, opts.limit)?;
            let mut report = Report {
                tar_entry: Some(f.name),
                ..Default::default()
            };
            disk_layer(f.reader, writer, opts, Some(f.size), &mut report)?;
            Ok::<_, PipelineError>(report)
        })
    })
}

/// Every visible file under `/disk` in one containerDisk layer, through `f` (see
/// [`DiskFinder::scan_files`]); the layer is read to its end.
pub fn disk_files_in_layer(
    layer: &mut dyn Read,
    integrity: Integrity,
    finder: &mut DiskFinder,
    f: impl FnMut(crate::decode::tar::TarFile<'_>) -> Result<(), PipelineError>,
) -> Result<(), PipelineError> {
    with_layer_tar(layer, integrity, |reader| finder.scan_files(reader, f))
}

/// A containerDisk layer's tar stream (under gzip or zstd, or plain) through `body`,
/// then the rest of the layer read to its end.
fn with_layer_tar<T>(
    layer: &mut dyn Read,
    integrity: Integrity,
    body: impl FnOnce(&mut dyn Read) -> Result<T, PipelineError>,
) -> Result<T, PipelineError> {
    let mut peek = PeekReader::new(layer, SNIFF_LEN).map_err(|e| read_error(e, None))?;
    let format = sniff(peek.head());
    let out = {
        let mut reader: Box<dyn Read + '_> = if format.is_compression() {
            decode::decompressor(format, &mut peek, integrity)
                .map_err(|e| read_error(e, Some(format)))?
                .ok_or(PipelineError::Unsupported(format))?
        } else {
            Box::new(&mut peek)
        };
        let out = body(&mut reader)?;
        io::copy(&mut reader, &mut io::sink())
            .map_err(|e| read_error(e, format.is_compression().then_some(format)))?;
        out
    };
    io::copy(&mut peek, &mut io::sink()).map_err(|e| read_error(e, None))?;
    Ok(out)
}

/// Unpacks a (possibly compressed) tar into `dir` (content type `archive`).
pub fn unpack_archive(
    source: &mut dyn Read,
    dir: &Path,
    opts: &Options,
) -> Result<Report, PipelineError> {
    let mut report = Report::default();
    archive_layer(source, dir, opts, &mut report)?;
    Ok(report)
}

fn archive_layer(
    r: &mut dyn Read,
    dir: &Path,
    opts: &Options,
    report: &mut Report,
) -> Result<(), PipelineError> {
    let last = report.layers.last().copied();
    let mut peek = PeekReader::new(r, SNIFF_LEN).map_err(|e| read_error(e, last))?;
    let format = sniff(peek.head());
    push_layer(report, format)?;
    if format.is_compression() {
        let mut d = decode::decompressor(format, &mut peek, opts.integrity)
            .map_err(|e| read_error(e, Some(format)))?
            .ok_or(PipelineError::Unsupported(format))?;
        return archive_layer(&mut d, dir, opts, report);
    }
    if format != Format::Tar {
        return Err(PipelineError::NotAnArchive(format));
    }
    let progress = opts.progress.clone();
    let stats = decode::tar::unpack(&mut peek, dir, opts.limit, |n| {
        progress.add_decoded(n);
        progress.add_written(n);
    })?;
    report.virtual_size = stats.bytes;
    tracing::info!(files = stats.files, bytes = stats.bytes, dir = %dir.display(), "unpacked archive");
    Ok(())
}

fn push_layer(report: &mut Report, f: Format) -> Result<(), PipelineError> {
    if report.layers.len() >= MAX_LAYERS {
        return Err(PipelineError::TooDeep);
    }
    report.layers.push(f);
    Ok(())
}

/// A read error below a decoder is the decoder's (corrupt data) unless it came from
/// the source itself.
fn read_error(e: io::Error, layer: Option<Format>) -> PipelineError {
    if find_in_chain::<SourceError>(&e).is_some() {
        return PipelineError::Read(e);
    }
    match layer {
        Some(format) => PipelineError::Corrupt { format, source: e },
        None => PipelineError::Read(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::sparse::tests::MemTarget;
    use crate::sink::sparse::WriterOptions;
    use std::io::Write;

    fn run(input: &[u8], limit: u64) -> (Result<Report, PipelineError>, Vec<u8>) {
        let t = MemTarget::default();
        let mut w = SparseWriter::spawn(
            Box::new(t.clone()),
            WriterOptions {
                limit,
                ..Default::default()
            },
        );
        let opts = Options {
            limit,
            source_len: Some(input.len() as u64),
            progress: Arc::default(),
            scratch: None,
            source_file: None,
            keep_qcow2: false,
            integrity: Integrity::Crc,
        };
        let r = write_disk(&mut &input[..], &mut w, &opts);
        match &r {
            Ok(rep) => {
                w.finish(rep.virtual_size).expect("finish");
            }
            Err(_) => w.abort(),
        }
        let data = t.data.lock().expect("lock").clone();
        (r, data)
    }

    fn disk() -> Vec<u8> {
        let mut d = vec![0u8; 3 << 20];
        for (i, b) in d.iter_mut().enumerate().skip(70_000).take(500_000) {
            *b = (i % 251) as u8;
        }
        d
    }

    #[test]
    fn gzip_of_tar_of_raw() {
        let img = disk();
        let mut tb = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(img.len() as u64);
        h.set_mode(0o644);
        tb.append_data(&mut h, "disk.img", &img[..]).expect("tar");
        let t = tb.into_inner().expect("tar");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&t).expect("gz");
        let gz = e.finish().expect("gz");
        let (r, data) = run(&gz, u64::MAX);
        let rep = r.expect("ok");
        assert_eq!(rep.describe(), "gzip+tar+raw");
        assert_eq!(rep.tar_entry.as_deref(), Some("disk.img"));
        assert_eq!(data, img);
    }

    #[test]
    fn too_large_raw_is_refused_before_writing() {
        let img = disk();
        let (r, data) = run(&img, 1 << 20);
        assert!(matches!(r, Err(PipelineError::TooLarge(_))), "{r:?}");
        assert!(data.is_empty());
        assert_eq!(r.expect_err("err").kind(), ErrorKind::TooLarge);
    }

    #[test]
    fn decompression_bomb_is_capped() {
        let zeros = vec![0u8; 8 << 20];
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(&zeros).expect("xz");
        let xz = e.finish().expect("xz");
        let (r, _) = run(&xz, 2 << 20);
        let err = r.expect_err("bomb");
        assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
        assert!(err
            .to_string()
            .contains("is larger than the reported available storage"));
    }

    #[test]
    fn corrupt_zstd_is_named() {
        let mut z = zstd::encode_all(&disk()[..], 1).expect("zstd");
        let n = z.len();
        z.truncate(n / 2);
        let (r, _) = run(&z, u64::MAX);
        let err = r.expect_err("corrupt");
        assert_eq!(err.kind(), ErrorKind::CorruptImage, "{err}");
        assert!(
            err.to_string().starts_with("zstd stream is corrupt"),
            "{err}"
        );
    }

    #[test]
    fn vmdk_parent_is_refused_before_writing() {
        let mut q = b"KDMV".to_vec();
        q.resize(4096, 0);
        q[4] = 1; // version
        q[12..20].copy_from_slice(&2048u64.to_le_bytes()); // capacity (sectors)
        q[20..28].copy_from_slice(&128u64.to_le_bytes()); // grain
        q[28..36].copy_from_slice(&1u64.to_le_bytes()); // descriptor at sector 1
        q[36..44].copy_from_slice(&1u64.to_le_bytes());
        q[44..48].copy_from_slice(&512u32.to_le_bytes());
        let desc = b"parentFileNameHint=\"/etc/shadow\"\n";
        q[512..512 + desc.len()].copy_from_slice(desc);
        let (r, data) = run(&q, u64::MAX);
        let err = r.expect_err("parent");
        assert_eq!(err.kind(), ErrorKind::UnsupportedFormat, "{err}");
        assert!(err.to_string().contains("/etc/shadow"), "{err}");
        assert!(data.is_empty());
    }
}
