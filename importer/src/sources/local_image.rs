//! Local containerDisks for air-gapped and workstation use: `oci:DIR[:tag]` (OCI image
//! layout), `oci-archive:FILE[:tag]` (the same in a tar, a CDI transport) and
//! `docker-archive:FILE[:repo:tag]` (`docker save` / `podman save`). A tar is indexed
//! once (entry offsets) and read in place: nothing is unpacked.

use super::image::ContainerImage;
use super::registry::{
    check_config, node_arch, pull_err, select_platform, PlatformEntry, RegistryError,
};
use ferrydisk_common::checksum::DigestReader;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::stream::CountingReader;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// Metadata files (index, manifests, configs) are small; refuse to load big ones.
const MAX_METADATA: u64 = 4 << 20;

/// The files of an image: a directory, or a tar read in place.
enum Files {
    Dir(PathBuf),
    Tar {
        path: PathBuf,
        index: HashMap<String, (u64, u64)>,
    },
}

fn clean(name: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::CurDir | Component::RootDir => {}
            _ => return None, // `..` never names a blob
        }
    }
    Some(parts.join("/"))
}

impl Files {
    fn tar(path: &Path) -> io::Result<Self> {
        let mut archive = tar::Archive::new(File::open(path)?);
        let mut index = HashMap::new();
        for e in archive.entries_with_seek()? {
            let e = e?;
            if e.header().entry_type().is_file() {
                if let Some(name) = e.path().ok().and_then(|p| clean(&p.to_string_lossy())) {
                    index.insert(name, (e.raw_file_position(), e.size()));
                }
            }
        }
        Ok(Files::Tar {
            path: path.to_path_buf(),
            index,
        })
    }

    fn open(&self, name: &str) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let name = clean(name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid path {name:?} in image"),
            )
        })?;
        match self {
            Files::Dir(dir) => {
                let f = File::open(dir.join(&name))?;
                let len = f.metadata()?.len();
                Ok((Box::new(f), len))
            }
            Files::Tar { path, index } => {
                let &(off, len) = index.get(&name).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{name} is not in {}", path.display()),
                    )
                })?;
                let mut f = File::open(path)?;
                f.seek(SeekFrom::Start(off))?;
                Ok((Box::new(f.take(len)), len))
            }
        }
    }

    fn json(&self, name: &str) -> Result<serde_json::Value, RegistryError> {
        let (r, len) = self.open(name).map_err(pull_err)?;
        if len > MAX_METADATA {
            return Err(RegistryError::Config(format!("{name} is {len} bytes")));
        }
        let mut buf = Vec::new();
        r.take(MAX_METADATA)
            .read_to_end(&mut buf)
            .map_err(pull_err)?;
        serde_json::from_slice(&buf).map_err(|e| RegistryError::Config(format!("{name}: {e}")))
    }
}

struct Layer {
    name: String,
    digest: Option<String>,
    size: u64,
    media_type: String,
    title: Option<String>,
    annotations: Option<std::collections::BTreeMap<String, String>>,
}

pub struct LocalImage {
    files: Files,
    layers: Vec<Layer>,
    env: Vec<String>,
    artifact_type: Option<String>,
    shown: String,
}

/// `FILE:tag` / `DIR:tag` -> (path, tag); a colon inside the path is kept when what
/// follows it contains a slash.
fn split_tag(rest: &str) -> (&str, Option<&str>) {
    match rest.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') && !p.is_empty() => (p, Some(t)),
        _ => (rest, None),
    }
}

/// Opens a local image, or `Ok(None)` when `endpoint` names no local transport.
pub fn open(endpoint: &str, arch: Option<&str>) -> Result<Option<LocalImage>, RegistryError> {
    let io_err = |e: io::Error| pull_err(e);
    let img = if let Some(rest) = endpoint.strip_prefix("oci:") {
        let (dir, tag) = split_tag(rest);
        oci_layout(Files::Dir(dir.into()), tag, arch, endpoint)?
    } else if let Some(rest) = endpoint.strip_prefix("oci-archive:") {
        let (file, tag) = split_tag(rest);
        oci_layout(
            Files::tar(Path::new(file)).map_err(io_err)?,
            tag,
            arch,
            endpoint,
        )?
    } else if let Some(rest) = endpoint.strip_prefix("docker-archive:") {
        let (file, tag) = match rest.split_once(':') {
            Some((f, t)) => (f, Some(t)),
            None => (rest, None),
        };
        docker_archive(
            Files::tar(Path::new(file)).map_err(io_err)?,
            tag,
            arch,
            endpoint,
        )?
    } else {
        return Ok(None);
    };
    tracing::info!(image = %img.shown, layers = img.layers.len(), "opened local image");
    Ok(Some(img))
}

fn blob_name(digest: &str) -> Result<String, RegistryError> {
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| RegistryError::Config(format!("invalid digest {digest:?}")))?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit())
        || !alg.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(RegistryError::Config(format!("invalid digest {digest:?}")));
    }
    Ok(format!("blobs/{alg}/{hex}"))
}

fn str_field<'a>(v: &'a serde_json::Value, k: &str) -> &'a str {
    v.get(k).and_then(|x| x.as_str()).unwrap_or("")
}

/// The manifest descriptor a tag names in `index.json` (through an image index, the
/// platform `arch` or the node's).
fn top_manifest(
    files: &Files,
    tag: Option<&str>,
    arch: Option<&str>,
    shown: &str,
) -> Result<serde_json::Value, RegistryError> {
    let index = files.json("index.json")?;
    let entries = index
        .get("manifests")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    let entry = match tag {
        Some(t) => entries.iter().find(|e| {
            e.pointer("/annotations/org.opencontainers.image.ref.name")
                .and_then(|v| v.as_str())
                == Some(t)
        }),
        None if entries.len() == 1 => entries.first(),
        None => {
            return Err(pull_err(format!(
                "{shown}: the layout holds {} images; name one with :tag",
                entries.len()
            )))
        }
    }
    .ok_or_else(|| pull_err(format!("{shown}: no image with that tag in the layout")))?;
    let mut desc = entry.clone();
    if str_field(&desc, "mediaType").contains("index")
        || str_field(&desc, "mediaType").contains("manifest.list")
    {
        let idx = files.json(&blob_name(str_field(&desc, "digest"))?)?;
        let list: Vec<serde_json::Value> = idx
            .get("manifests")
            .and_then(|m| m.as_array())
            .cloned()
            .unwrap_or_default();
        let platforms: Vec<PlatformEntry> = list
            .iter()
            .filter_map(|m| {
                let p = m.get("platform")?;
                Some(PlatformEntry {
                    os: str_field(p, "os").into(),
                    arch: str_field(p, "architecture").into(),
                    variant: p.get("variant").and_then(|v| v.as_str()).map(String::from),
                    digest: str_field(m, "digest").into(),
                })
            })
            .collect();
        let want = arch
            .map(String::from)
            .unwrap_or_else(|| node_arch().to_string());
        let chosen = select_platform(&platforms, &want)?.digest.clone();
        desc = serde_json::json!({ "digest": chosen });
    }
    Ok(desc)
}

/// A manifest's layers as the reader takes them.
fn layers_of(manifest: &serde_json::Value) -> Result<Vec<Layer>, RegistryError> {
    manifest
        .get("layers")
        .and_then(|l| l.as_array())
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|l| {
            let digest = str_field(l, "digest").to_string();
            Ok(Layer {
                name: blob_name(&digest)?,
                size: l.get("size").and_then(|s| s.as_u64()).unwrap_or(0),
                digest: Some(digest),
                media_type: str_field(l, "mediaType").to_string(),
                title: l
                    .pointer("/annotations/org.opencontainers.image.title")
                    .and_then(|v| v.as_str())
                    .map(String::from),
                annotations: l
                    .get("annotations")
                    .and_then(|a| serde_json::from_value(a.clone()).ok()),
            })
        })
        .collect::<Result<Vec<_>, RegistryError>>()
}

fn oci_layout(
    files: Files,
    tag: Option<&str>,
    arch: Option<&str>,
    shown: &str,
) -> Result<LocalImage, RegistryError> {
    let desc = top_manifest(&files, tag, arch, shown)?;
    let manifest = files.json(&blob_name(str_field(&desc, "digest"))?)?;
    let config_desc = manifest.get("config").unwrap_or(&serde_json::Value::Null);
    let config = files.json(&blob_name(str_field(config_desc, "digest"))?)?;
    let artifact_type = manifest
        .get("artifactType")
        .and_then(|v| v.as_str())
        .map(String::from)
        .or_else(|| {
            let mt = str_field(config_desc, "mediaType");
            (!super::image::is_image_config(mt)).then(|| mt.to_string())
        });
    let env = match artifact_type {
        None => check_config(&config, arch)?,
        Some(_) => Vec::new(),
    };
    let layers = layers_of(&manifest)?;
    Ok(LocalImage {
        files,
        layers,
        env,
        artifact_type,
        shown: shown.to_string(),
    })
}

fn docker_archive(
    files: Files,
    tag: Option<&str>,
    arch: Option<&str>,
    shown: &str,
) -> Result<LocalImage, RegistryError> {
    let manifest = files.json("manifest.json")?;
    let images = manifest.as_array().cloned().unwrap_or_default();
    let img = match tag {
        Some(t) => images.iter().find(|i| {
            i.get("RepoTags")
                .and_then(|r| r.as_array())
                .is_some_and(|r| {
                    r.iter().any(|x| {
                        x.as_str()
                            .is_some_and(|x| x == t || x.ends_with(&format!("/{t}")))
                    })
                })
        }),
        None => images.first(),
    }
    .ok_or_else(|| pull_err(format!("{shown}: no such image in the archive")))?;
    let config = files.json(str_field(img, "Config"))?;
    let env = check_config(&config, arch)?;
    let mut layers = Vec::new();
    for l in img
        .get("Layers")
        .and_then(|l| l.as_array())
        .cloned()
        .unwrap_or_default()
    {
        let name = l.as_str().unwrap_or("").to_string();
        // Newer `docker save` stores layers as OCI blobs, whose names are digests.
        let digest = name
            .strip_prefix("blobs/sha256/")
            .map(|h| format!("sha256:{h}"));
        let size = files.open(&name).map(|(_, n)| n).map_err(pull_err)?;
        layers.push(Layer {
            name,
            digest,
            size,
            // `docker save` layers are tars, always.
            media_type: "application/vnd.docker.image.rootfs.diff.tar".into(),
            title: None,
            annotations: None,
        });
    }
    Ok(LocalImage {
        files,
        layers,
        env,
        artifact_type: None,
        shown: shown.to_string(),
    })
}

impl ContainerImage for LocalImage {
    fn describe(&self) -> &str {
        &self.shown
    }
    fn env(&self) -> &[String] {
        &self.env
    }
    fn layer_count(&self) -> usize {
        self.layers.len()
    }
    fn layer_size(&self, idx: usize) -> u64 {
        self.layers[idx].size
    }
    fn layer_info(&self, idx: usize) -> super::image::LayerInfo<'_> {
        let l = &self.layers[idx];
        super::image::LayerInfo {
            media_type: &l.media_type,
            digest: l.digest.as_deref(),
            title: l.title.as_deref(),
            annotations: l.annotations.as_ref(),
        }
    }
    fn artifact_type(&self) -> Option<&str> {
        self.artifact_type.as_deref()
    }
    fn open_layer(
        &self,
        idx: usize,
        progress: Arc<Progress>,
    ) -> io::Result<Box<dyn Read + Send + '_>> {
        let layer = &self.layers[idx];
        let (r, _) = self.files.open(&layer.name)?;
        let counted = CountingReader::new(r, move |n| progress.add_source(n));
        Ok(match &layer.digest {
            Some(d) => Box::new(
                DigestReader::new(counted, d)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            ),
            None => Box::new(counted),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_digests() {
        assert_eq!(split_tag("/srv/layout:v1"), ("/srv/layout", Some("v1")));
        assert_eq!(split_tag("/srv/layout"), ("/srv/layout", None));
        assert_eq!(split_tag("./a:b/c"), ("./a:b/c", None));
        assert_eq!(blob_name("sha256:abc").expect("ok"), "blobs/sha256/abc");
        assert!(blob_name("sha256:../../etc").is_err());
        assert_eq!(clean("./blobs/../x"), None);
    }
}
