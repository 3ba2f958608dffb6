//! What a subcommand asks of the disk, parsed once: the destination, size, checksum,
//! O_DIRECT, qcow2 output, and where the decoded disk goes ([`Output`]).

use crate::cli::{parse_go_bool, OutputFormat, VolumeArgs};
use crate::destination::Destination;
use crate::failure::Failure;
use ferrydisk_common::cdi::space::{parse_overhead, parse_quantity};
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::checksum::Checksum;
use ferrydisk_common::pipeline::Report;
use ferrydisk_common::sink::Target;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What a subcommand asks of the disk, as given (env vars and flags, unparsed).
pub struct DiskRequest<'a> {
    pub volume: &'a VolumeArgs,
    /// `--dest`, overriding CDI's choice between block device and `<data-dir>/disk.img`.
    pub dest: Option<&'a Path>,
    /// Archive content: unpacked into `--data-dir`.
    pub archive: bool,
    pub preallocation: Option<&'a str>,
    pub image_size: &'a str,
    pub checksum: Option<&'a str>,
}

/// How a bad value in a [`DiskRequest`] is treated: CDI's importer refuses it, CDI's
/// upload server falls back to the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsing {
    Strict,
    Lenient,
}

/// A streamed push's target and the size the disk may reach.
pub type StreamSink = (Box<dyn Target>, u64);

/// How the bytes are written, whatever the source (import or upload).
pub struct DiskPlan {
    pub dest: Destination,
    pub preallocate: bool,
    pub requested: Option<u64>,
    pub overhead: f64,
    /// Every digest the source bytes must match (none, one, or several at once).
    pub checksum: Vec<Checksum>,
    /// O_DIRECT where the destination allows it (`CACHE_MODE=TRYNONE`).
    pub direct: bool,
    /// A mounted scratch volume, if any (CDI: a missing one means "required").
    pub scratch: Option<PathBuf>,
    /// Write the disk as qcow2 (`--output-format qcow2`; file destinations only): a
    /// qcow2 source is kept as it is, anything else goes through the qcow2 writer.
    pub qcow2_out: bool,
    /// qcow2 output with compressed clusters.
    pub qcow2_compress: bool,
    /// A block destination already reads as zeros: skip zero runs (`--target-zeroed`).
    pub target_zeroed: bool,
    /// Where the decoded disk goes.
    pub output: Output,
}

/// Where the decoded disk goes: the destination, nowhere, or a push's stream.
#[derive(Default)]
pub enum Output {
    /// The destination: a file, a block device, or a directory for an archive.
    #[default]
    Volume,
    /// `importer inspect`: the whole pipeline runs into a writer that keeps nothing, and
    /// what it found is left here instead of on a disk.
    Discard(Arc<Inspected>),
    /// A push streaming the disk as it is imported: the target (taken once: a second
    /// pass over the disk fails with [`Failure::StreamTaken`]) and the size the disk
    /// may reach.
    Stream(Mutex<Option<StreamSink>>),
}

impl Output {
    pub fn stream(sink: StreamSink) -> Self {
        Output::Stream(Mutex::new(Some(sink)))
    }

    pub(super) fn inspected(&self) -> Option<&Inspected> {
        match self {
            Output::Discard(found) => Some(found),
            _ => None,
        }
    }
}

/// What an inspecting run found: the pipeline's report and the SHA-256 of the stream
/// it read (an HTTP body, a file, an artifact's blob).
#[derive(Default)]
pub struct Inspected {
    pub report: Mutex<Option<Report>>,
    pub source_sha256: Arc<Mutex<sha2::Sha256>>,
    pub hashed: std::sync::atomic::AtomicBool,
}

impl DiskPlan {
    /// The one constructor: every subcommand's disk settings are parsed here.
    pub fn new(r: DiskRequest<'_>, parsing: Parsing) -> Result<Self, Failure> {
        let strict = parsing == Parsing::Strict;
        let v = r.volume;
        // CDI exits 1 when PREALLOCATION does not parse. The controller always sets it;
        // for people running the binary by hand, unset means false.
        let preallocate = match r.preallocation {
            None => false,
            Some(s) => match parse_go_bool(s) {
                Some(b) => b,
                None if strict => {
                    return Err(Failure::Config(format!(
                        "Unable to parse PREALLOCATION {s:?}: expected a boolean"
                    )))
                }
                None => false,
            },
        };
        let requested = match r.image_size.trim() {
            "" => None,
            s => match parse_quantity(s) {
                Ok(q) => Some(q),
                Err(e) if strict => {
                    return Err(Failure::Config(format!("IMPORTER_IMAGE_SIZE: {e}")))
                }
                Err(_) => None,
            },
        };
        let checksum = match r.checksum {
            None => Vec::new(),
            Some(s) => Checksum::parse_list(s).map_err(|e| Failure::Config(e.to_string()))?,
        };
        let dest = Destination::choose(r.dest, &v.block_device, &v.data_dir, r.archive);
        let mut qcow2_out = v.output_format == OutputFormat::Qcow2;
        if qcow2_out && matches!(dest, Destination::Block(_)) {
            if strict {
                return Err(Failure::Config(
                    "--output-format qcow2 needs a file destination, not a block device".into(),
                ));
            }
            qcow2_out = false;
        }
        Ok(DiskPlan {
            output: Output::Volume,
            qcow2_compress: qcow2_out && v.qcow2_compress,
            target_zeroed: v.target_zeroed,
            qcow2_out,
            preallocate,
            requested,
            overhead: parse_overhead(&v.filesystem_overhead),
            checksum,
            direct: v.direct(),
            dest,
            // Only a mounted scratch volume counts (CDI: a missing one means "required").
            scratch: v.scratch.is_dir().then(|| v.scratch.clone()),
        })
    }

    /// A disk of the importer's own, `<data_dir>/disk.img` as `format`, sized by what
    /// the source holds: no volume request, no preallocation, no overhead (a push's
    /// spool and `inspect`, whose output replaces the file).
    pub fn local(data_dir: &Path, scratch: &Path, format: OutputFormat) -> Self {
        DiskPlan {
            dest: Destination::File(data_dir.join("disk.img")),
            preallocate: false,
            requested: None,
            overhead: 0.0,
            checksum: Vec::new(),
            direct: true,
            scratch: scratch.is_dir().then(|| scratch.to_path_buf()),
            qcow2_out: format == OutputFormat::Qcow2,
            qcow2_compress: false,
            target_zeroed: false,
            output: Output::Volume,
        }
    }

    /// The same settings, writing to the volume: a new upload's plan.
    pub fn for_volume(&self) -> DiskPlan {
        DiskPlan {
            dest: self.dest.clone(),
            preallocate: self.preallocate,
            requested: self.requested,
            overhead: self.overhead,
            checksum: self.checksum.clone(),
            direct: self.direct,
            scratch: self.scratch.clone(),
            qcow2_out: self.qcow2_out,
            qcow2_compress: self.qcow2_compress,
            target_zeroed: self.target_zeroed,
            output: Output::Volume,
        }
    }

    /// `IMPORTER_SOURCE=none`: the destination itself, with no source.
    pub fn create_blank(&self) -> Result<Option<TerminationMessage>, Failure> {
        crate::blank::create(&self.dest, self.requested, self.overhead, self.preallocate)
    }
}
