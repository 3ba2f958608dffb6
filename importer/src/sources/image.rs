//! A containerDisk, wherever it is stored: a registry, an OCI layout (directory or
//! `oci-archive` tar), a `docker save` archive. The import reads layers top first
//! through this one interface.

use ferrydisk_common::progress::Progress;
use std::io::{self, Read};
use std::sync::Arc;

pub trait ContainerImage: Send + Sync {
    /// For logs (`docker://host/repo:tag`, `oci:/dir:tag`).
    fn describe(&self) -> &str;
    /// The image config's `Env` (labels come from here).
    fn env(&self) -> &[String];
    fn layer_count(&self) -> usize;
    /// Stored (compressed) size of layer `idx`, bottom layer 0.
    fn layer_size(&self, idx: usize) -> u64;
    /// Layer `idx`'s stored bytes; reading to the end verifies its digest where the
    /// image format records one.
    fn open_layer(
        &self,
        idx: usize,
        progress: Arc<Progress>,
    ) -> io::Result<Box<dyn Read + Send + '_>>;
}
