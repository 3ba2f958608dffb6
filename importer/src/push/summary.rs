//! What a push reports: one JSON line on stdout.

use super::layer::Produced;
use super::source::Source;

/// What a push did, printed as one JSON line on stdout.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub reference: String,
    pub manifest_digest: String,
    pub layer_digest: String,
    pub layer_size: u64,
    pub layer_media_type: String,
    /// False when the registry already had the layer blob.
    pub layer_uploaded: bool,
    /// True when the registry mounted the layer from `--mount-from`.
    pub layer_mounted: bool,
    /// The payload's format (what the layer holds).
    pub format: String,
    /// What the source was (an import's finding: `vmdk`, `qcow2`, ...).
    pub source_format: String,
    pub virtual_size: u64,
    pub source_size: u64,
    /// How the layer was made: from the file as stored, streamed while the source was
    /// imported, or imported into a spool first.
    pub route: Route,
    /// Why it spooled, when it did.
    pub spool_reason: Option<SpoolReason>,
    /// Reads of the source begun from its start: a one-pass attempt (which stops where
    /// the data begins when a containerDisk's length is unknown, or where the data goes
    /// out of guest order), a measuring pass, a digest-only pass, the pass that
    /// uploads, the import into a spool; for a local file, the digest pass and the
    /// upload.
    pub passes: u32,
    /// The layer's digest was computed before any upload, and the registry asked.
    pub digest_first: bool,
}

/// How a push's layer was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    /// A local file or device, read as it is stored.
    Stored,
    /// Imported straight into the upload, no spool.
    Streamed,
    /// Imported into a spool file, then pushed from it.
    Spooled,
}

/// Why a push spooled instead of streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpoolReason {
    /// `--spool-dir` asks for it.
    SpoolDir,
    /// The data came out of guest order (or the disk is written twice, an overlay
    /// chain): only a file takes it.
    OutOfOrder,
    /// Into a local layout or archive, which streams from a file.
    LocalTarget,
}

impl Summary {
    pub fn new(reference: String, manifest_digest: String, pre: Produced, src: &Source) -> Self {
        Summary {
            reference,
            manifest_digest,
            layer_digest: pre.digest,
            layer_size: pre.size,
            layer_media_type: src.media.clone(),
            layer_uploaded: false,
            layer_mounted: false,
            format: src.format.name().to_string(),
            source_format: src.origin.format.clone(),
            virtual_size: src.virtual_size,
            source_size: src.origin.source_size,
            route: Route::Stored,
            spool_reason: None,
            passes: 0,
            digest_first: false,
        }
    }
}
