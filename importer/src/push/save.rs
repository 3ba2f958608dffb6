//! `importer push SOURCE oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
//! `docker-archive:FILE[:NAME:TAG]`: the same image a registry push makes, saved
//! locally (minivirt's `save`, pcocc's export). The import reads all three back.
//!
//! * An OCI layout directory gets its blobs in one pass: the layer is produced into a
//!   temporary file under `blobs/sha256/` and renamed to its digest. A blob already
//!   there is kept. `index.json` gains (or replaces) the entry for the tag.
//! * An archive is a tar whose entries need their size up front. A first pass computes
//!   the layer's digest and size without storing it. The second pass writes the layer
//!   straight into the tar after its header. The archive is built under a temporary
//!   name and renamed when complete, so a failed save leaves no half archive.

use super::error::SaveError;
use super::image::{blobs as image_blobs, Top};
use super::layer::{self, Layout, Produced};
use super::source::{SkipHoles, Source};
use super::summary::Summary;
use super::target::{Kind, Local};
use crate::config::push::ImageSettings;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;

pub fn save(image: &ImageSettings, local: &Local, src: Source) -> Result<Summary, SaveError> {
    if local.kind == Kind::DockerArchive
        && (src.spec.layout == Layout::Artifact || src.spec.zstd.is_some())
    {
        return Err(SaveError::NotDockerArchive);
    }
    let made = match local.kind {
        Kind::Layout => save_layout(image, local, &src),
        Kind::OciArchive | Kind::DockerArchive => save_archive(image, local, &src),
    };
    let (manifest_digest, pre, written) = made.map_err(|source| SaveError::Io {
        dest: local.shown(),
        source,
    })?;
    tracing::info!(dest = %local.shown(), digest = %manifest_digest, layer = %pre.digest, "saved");
    let mut s = Summary::new(local.shown(), manifest_digest, pre, &src);
    s.layer_uploaded = written;
    // A layout's blob is written in one pass; an archive's needs its size first.
    s.passes = if local.kind == Kind::Layout { 1 } else { 2 };
    s.digest_first = local.kind != Kind::Layout;
    Ok(s)
}

fn blob_name(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

fn hex(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

/// An OCI layout directory; returns (manifest digest, layer, whether the layer blob
/// was written rather than found).
fn save_layout(
    image: &ImageSettings,
    local: &Local,
    src: &Source,
) -> io::Result<(String, Produced, bool)> {
    let blobs = local.path.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    fs::write(
        local.path.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let tmp = blobs.join(format!(".ferrydisk-{}.tmp", std::process::id()));
    let out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    let made = layer::produce(
        &mut SkipHoles::new(&src.file, src.len),
        src.len,
        &src.spec,
        out,
    )
    .and_then(|(out, p)| {
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(p)
    });
    let pre = match made {
        Ok(p) => p,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let layer_path = local.path.join(blob_name(&pre.digest));
    let written = !layer_path.exists();
    if written {
        fs::rename(&tmp, &layer_path)?;
    } else {
        tracing::info!(digest = %pre.digest, "the layout has this layer; kept");
        fs::remove_file(&tmp)?;
    }
    let blobs = image_blobs(image, src, &pre);
    for (digest, data) in blobs.all() {
        write_blob(&local.path, digest, data)?;
    }
    let Top {
        media_type: top_media,
        digest: manifest_digest,
        size: top_size,
    } = blobs.top();
    write_index(local, top_media, &manifest_digest, top_size)?;
    Ok((manifest_digest, pre, written))
}

/// `index.json`: the other tags stay, this tag points at the new manifest.
fn write_index(
    local: &Local,
    top_media: &str,
    manifest_digest: &str,
    top_size: usize,
) -> io::Result<()> {
    let index_path = local.path.join("index.json");
    let mut index = match fs::read(&index_path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("index.json: {e}")))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            serde_json::json!({"schemaVersion": 2, "manifests": []})
        }
        Err(e) => return Err(e),
    };
    let mut entries: Vec<serde_json::Value> = index["manifests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e.pointer("/annotations/org.opencontainers.image.ref.name")
                .and_then(|n| n.as_str())
                != Some(local.tag.as_str())
        })
        .collect();
    entries.push(manifest_entry(
        top_media,
        manifest_digest,
        top_size,
        &local.tag,
    ));
    index["schemaVersion"] = 2.into();
    index["manifests"] = entries.into();
    let tmp_index = local.path.join(".index.json.tmp");
    fs::write(&tmp_index, serde_json::to_vec(&index).expect("json"))?;
    fs::rename(&tmp_index, &index_path)?;
    Ok(())
}

fn manifest_entry(media_type: &str, digest: &str, size: usize, tag: &str) -> serde_json::Value {
    serde_json::json!({
        "mediaType": media_type,
        "digest": digest,
        "size": size,
        "annotations": {"org.opencontainers.image.ref.name": tag},
    })
}

fn write_blob(root: &Path, digest: &str, data: &[u8]) -> io::Result<()> {
    let p = root.join(blob_name(digest));
    if !p.exists() {
        fs::write(p, data)?;
    }
    Ok(())
}

/// A tar built entry by entry: header, data, padding to 512.
struct TarOut<W: Write> {
    out: W,
}

impl<W: Write> TarOut<W> {
    fn header(&mut self, name: &str, size: u64) -> io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_path(name)?;
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        self.out.write_all(h.as_bytes())
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let rem = (size % 512) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; 512][..512 - rem])?;
        }
        Ok(())
    }

    fn file(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.header(name, data.len() as u64)?;
        self.out.write_all(data)?;
        self.pad(data.len() as u64)
    }

    fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; 1024])?;
        Ok(self.out)
    }
}

/// An oci-archive or docker-archive; returns (manifest digest, layer, true).
fn save_archive(
    image: &ImageSettings,
    local: &Local,
    src: &Source,
) -> io::Result<(String, Produced, bool)> {
    // Pass one: the layer's size and digest, for its tar header.
    let (_, pre) = layer::produce(
        &mut SkipHoles::new(&src.file, src.len),
        src.len,
        &src.spec,
        io::sink(),
    )?;
    let blobs = image_blobs(image, src, &pre);
    if local.kind == Kind::DockerArchive && blobs.index.is_some() {
        return Err(io::Error::other(
            "a docker-archive holds one platform: save a multi-arch index as oci: or oci-archive:",
        ));
    }
    let manifest_digest = blobs.top().digest;
    let name = local
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "archive".into());
    let tmp = local
        .path
        .with_file_name(format!(".{name}.ferrydisk-{}.tmp", std::process::id()));
    let result = (|| {
        let mut tar = TarOut {
            out: BufWriter::with_capacity(1 << 20, File::create(&tmp)?),
        };
        let layer_name = match local.kind {
            Kind::DockerArchive => format!("{}.tar", hex(&pre.digest)),
            _ => blob_name(&pre.digest),
        };
        if local.kind == Kind::OciArchive {
            tar.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        // Pass two: the layer straight into the archive after its header.
        tar.header(&layer_name, pre.size)?;
        let (out, got) = layer::produce(
            &mut SkipHoles::new(&src.file, src.len),
            src.len,
            &src.spec,
            tar.out,
        )?;
        tar.out = out;
        if got != pre {
            return Err(io::Error::other(format!(
                "{} changed while it was saved (layer {} then {})",
                src.shown, pre.digest, got.digest
            )));
        }
        tar.pad(pre.size)?;
        archive_metadata(&mut tar, local, &blobs, &layer_name)?;
        let f = tar.finish()?.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        fs::rename(&tmp, &local.path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| (manifest_digest, pre, true))
}

/// After the layer: the config and `manifest.json` (docker-archive), or the blobs and
/// `index.json` (oci-archive).
fn archive_metadata<W: Write>(
    tar: &mut TarOut<W>,
    local: &Local,
    blobs: &super::image::ImageBlobs,
    layer_name: &str,
) -> io::Result<()> {
    let Top {
        media_type: top_media,
        digest: manifest_digest,
        size: top_size,
    } = blobs.top();
    match local.kind {
        Kind::DockerArchive => {
            let (config_digest, config) = &blobs.configs[0];
            let config_name = format!("{}.json", hex(config_digest));
            tar.file(&config_name, config)?;
            let m = serde_json::json!([{
                "Config": config_name,
                "RepoTags": [local.tag],
                "Layers": [layer_name],
            }]);
            tar.file("manifest.json", &serde_json::to_vec(&m).expect("json"))?;
        }
        _ => {
            for (digest, data) in blobs.all() {
                tar.file(&blob_name(digest), data)?;
            }
            let index = serde_json::json!({
                "schemaVersion": 2,
                "manifests": [manifest_entry(top_media, &manifest_digest, top_size, &local.tag)],
            });
            tar.file("index.json", &serde_json::to_vec(&index).expect("json"))?;
        }
    }
    Ok(())
}
