//! `IMPORTER_SOURCE=registry`: a containerDisk from an OCI/Docker registry, streamed
//! layer by layer (top first) straight into the disk pipeline. No scratch, no copy of
//! the image anywhere. The requests are `net::registry`'s (bounded manifests and
//! configs, credentials only to the registry's origin, timeouts); oci-client lends its
//! manifest types and reference parser only.

use super::mirrors::{Endpoint, Mirrors};
use super::redact;
use super::resume::{self as pump, Body, Labels, Opened, Policy, Reopen, Resumable};
use crate::net::registry::{self as api, Access, ApiError, Connect, Registry};
use ferrydisk_common::checksum::DigestReader;
use ferrydisk_common::error::SourceError;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::stream::{self, ChannelReader};
use ferrydisk_common::ErrorKind;
use futures_util::StreamExt;
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::Reference;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A config blob is a few KiB; anything this large is not an image config.
const MAX_CONFIG: i64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("Invalid image name {0:?}: expected docker://registry/repository[:tag|@digest]")]
    Name(String),
    /// The source (an oci-client, I/O or JSON error) is kept for the error chain.
    #[error("failed to pull image: {0}")]
    Pull(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A request failed; its kind says whether retrying can help (a refused manifest,
    /// an unknown certificate authority cannot).
    #[error("failed to pull image: {0}")]
    Api(#[from] ApiError),
    #[error("Error validating architecture: {0}")]
    Platform(String),
    #[error("bootc image detected: bootable container images are not VM disks (label {0})")]
    Bootc(String),
    #[error("image config is invalid: {0}")]
    Config(String),
    #[error("{0}")]
    Mirrors(String),
}

impl RegistryError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RegistryError::Pull(_) => ErrorKind::Network,
            RegistryError::Api(e) => match e.kind() {
                // A registry answering 401/404 is what CDI retries too (the pod restarts).
                ErrorKind::SourceRefused if matches!(e, ApiError::Status { .. }) => {
                    ErrorKind::Network
                }
                k => k,
            },
            RegistryError::Name(_) | RegistryError::Mirrors(_) => ErrorKind::Config,
            _ => ErrorKind::SourceRefused,
        }
    }
}

pub struct RegistryOptions {
    pub username: Option<String>,
    pub password: Option<String>,
    pub auth_file: Option<PathBuf>,
    pub insecure: bool,
    pub ca_dirs: Vec<PathBuf>,
    /// `amd64`, `arm64`, `arm/v7`...; `None` = the node's own.
    pub arch: Option<String>,
    pub retries: u32,
    pub idle_timeout: Duration,
    pub proxies: super::client::Proxies,
    /// containers-registries.conf(5) with mirrors (`None`: the default file, if any).
    pub registries_conf: Option<PathBuf>,
}

/// A resolved single-platform image.
pub struct Image {
    rt: tokio::runtime::Handle,
    reg: Arc<Registry>,
    pub manifest: OciImageManifest,
    pub env: Vec<String>,
    pub artifact_type: Option<String>,
    pub shown: String,
    /// The digest of the manifest the tag names (an index for a multi-arch image).
    pub top_digest: String,
    /// `os/arch[/variant]` of every entry when the tag names an index.
    pub platforms: Vec<String>,
    /// The image config's `Labels`.
    pub config_labels: std::collections::BTreeMap<String, String>,
    retries: u32,
    idle_timeout: Duration,
}

/// The node's architecture in Go naming (what CDI defaults to).
pub fn node_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        "x86" => "386",
        other => other,
    }
}

pub fn pull_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> RegistryError {
    RegistryError::Pull(e.into())
}

/// `docker://host/repo:tag` -> reference. CDI accepts only `docker://` and
/// `oci-archive:` transports here.
pub fn parse_endpoint(endpoint: &str) -> Result<Reference, RegistryError> {
    let Some(rest) = endpoint.strip_prefix("docker://") else {
        return Err(RegistryError::Name(redact::url(endpoint)));
    };
    super::reference::parse(rest).map_err(|e| RegistryError::Name(format!("{rest}: {e}")))
}

/// The registry client for one endpoint (the reference's registry, or a mirror of
/// it): the CA files CDI mounts (`IMPORTER_CERT_DIR`, the proxy CA dir) on top of the
/// compiled-in Mozilla roots, so a FROM-scratch image needs no CA bundle; CDI's insecure
/// switch and its fallback to plain HTTP. `IMPORTER_ACCESS_KEY_ID`/`SECRET_KEY` go
/// only to the registry the user named; a mirror gets its auth-file entry, if any.
async fn connect(opts: &RegistryOptions, ep: &Endpoint) -> Result<Registry, RegistryError> {
    let http = super::client::build(&super::client::ClientOptions {
        ca_dirs: opts.ca_dirs.iter().map(PathBuf::as_path).collect(),
        insecure: ep.insecure,
        proxies: opts.proxies.clone(),
        localhost_names: Vec::new(),
    })
    .map_err(pull_err)?;
    let host = match ep.registry.as_str() {
        "index.docker.io" | "docker.io" => "registry-1.docker.io".to_string(),
        h => h.to_string(),
    };
    let (user, pass) = if ep.mirror {
        (None, None)
    } else {
        (opts.username.as_deref(), opts.password.as_deref())
    };
    Ok(Registry::connect(Connect {
        http,
        creds: credentials(user, pass, opts.auth_file.as_deref(), &ep.registry),
        host,
        repo: ep.repository.clone(),
        insecure: ep.insecure,
        access: Access::Pull,
        idle: opts.idle_timeout,
    })
    .await?)
}

/// Where `reference` is pulled from, in order (mirrors first, per registries.conf).
fn endpoints(
    opts: &RegistryOptions,
    reference: &Reference,
) -> Result<Vec<Endpoint>, RegistryError> {
    let mirrors = Mirrors::load(opts.registries_conf.as_deref())
        .map_err(|e| RegistryError::Mirrors(e.to_string()))?;
    mirrors
        .endpoints(
            reference.registry(),
            reference.repository(),
            reference.digest().is_some(),
            opts.insecure,
        )
        .map_err(|e| RegistryError::Mirrors(e.to_string()))
}

/// The first endpoint that serves the top manifest: its client, the manifest's bytes.
/// A mirror that fails (unreachable, refusing, serving bytes that do not hash to a
/// pinned digest) is logged and the next is tried.
async fn first_serving(
    opts: &RegistryOptions,
    reference: &Reference,
) -> Result<(Registry, bytes::Bytes), RegistryError> {
    let eps = endpoints(opts, reference)?;
    let wanted = tag_or_digest(reference);
    let mut last = None;
    for (i, ep) in eps.iter().enumerate() {
        let tried = async {
            let reg = connect(opts, ep).await?;
            let raw = reg.manifest(&wanted, api::MANIFEST_KINDS).await?;
            Ok::<_, RegistryError>((reg, raw))
        }
        .await;
        match tried {
            Ok(found) => {
                if ep.mirror {
                    tracing::info!(mirror = %format!("{}/{}", ep.registry, ep.repository), "pulling from a mirror (registries.conf)");
                }
                return Ok(found);
            }
            Err(e) if i + 1 < eps.len() => {
                tracing::warn!(endpoint = %format!("{}/{}", ep.registry, ep.repository), mirror = ep.mirror, error = %e, "pull failed here; trying the next mirror or the registry itself");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| RegistryError::Mirrors("no endpoint to pull from".into())))
}

/// A manifest or index as served (`what` names it in the error).
fn parse_manifest(raw: &[u8], what: &str) -> Result<OciManifest, RegistryError> {
    serde_json::from_slice(raw).map_err(|e| RegistryError::Config(format!("manifest {what}: {e}")))
}

/// A manifest or index by tag or digest, parsed.
async fn pull_manifest(reg: &Registry, reference: &str) -> Result<OciManifest, RegistryError> {
    let raw = reg.manifest(reference, api::MANIFEST_KINDS).await?;
    parse_manifest(&raw, reference)
}

/// The tag or digest a reference names.
fn tag_or_digest(r: &Reference) -> String {
    r.digest().or(r.tag()).unwrap_or("latest").to_string()
}

/// A username and password (both non-empty), else the registry's auth-file entry.
pub fn credentials(
    username: Option<&str>,
    password: Option<&str>,
    auth_file: Option<&Path>,
    registry: &str,
) -> Option<(String, String)> {
    match (username, password) {
        (Some(u), Some(p)) if !u.is_empty() && !p.is_empty() => Some((u.into(), p.into())),
        _ => auth_file.and_then(|f| auth_file_entry(f, registry)),
    }
}

/// Looks `registry` up in a `config.json`/`auth.json` (`{"auths":{"host":{"auth":"base64(user:pass)"}}}`).
pub fn auth_file_entry(path: &Path, registry: &str) -> Option<(String, String)> {
    use base64::Engine;
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let auths = v.get("auths")?.as_object()?;
    let want = normalise_host(registry);
    let aliases: &[&str] = if want == "docker.io" {
        &["docker.io", "index.docker.io", "registry-1.docker.io"]
    } else {
        &[]
    };
    let entry = auths.iter().find(|(k, _)| {
        let k = normalise_host(k);
        k == want || aliases.contains(&k.as_str())
    })?;
    let e = entry.1;
    if let (Some(u), Some(p)) = (
        e.get("username").and_then(|x| x.as_str()),
        e.get("password").and_then(|x| x.as_str()),
    ) {
        return Some((u.to_string(), p.to_string()));
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(e.get("auth")?.as_str()?)
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn normalise_host(k: &str) -> String {
    let k = k
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    k.split('/').next().unwrap_or(k).to_string()
}

/// One entry of an image index, as the platform choice sees it.
pub struct PlatformEntry {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
    pub digest: String,
}

/// Picks `linux/<want>` (`want` = `arch` or `arch/variant`) from an index, as
/// containers/image does for CDI; the error lists what the index offers.
pub fn select_platform<'a>(
    entries: &'a [PlatformEntry],
    want: &str,
) -> Result<&'a PlatformEntry, RegistryError> {
    let (arch, variant) = match want.split_once('/') {
        Some((a, v)) => (a, Some(v)),
        None => (want, None),
    };
    entries
        .iter()
        .find(|e| {
            e.os == "linux"
                && e.arch == arch
                && variant.is_none_or(|v| e.variant.as_deref() == Some(v))
        })
        .ok_or_else(|| {
            let offered: Vec<String> = entries
                .iter()
                .map(|e| {
                    format!(
                        "{}/{}{}",
                        e.os,
                        e.arch,
                        e.variant
                            .as_ref()
                            .map(|v| format!("/{v}"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            RegistryError::Platform(format!(
                "image index offers no manifest for linux/{want}; it has: {}",
                offered.join(", ")
            ))
        })
}

/// Checks a single-platform image's config against an explicitly requested platform and
/// refuses bootc images; returns the config's `Env`.
pub fn check_config(
    config: &serde_json::Value,
    requested: Option<&str>,
) -> Result<Vec<String>, RegistryError> {
    let arch = config
        .get("architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if let Some(req) = requested {
        let (want_arch, want_variant) = match req.split_once('/') {
            Some((a, v)) => (a, Some(v)),
            None => (req, None),
        };
        let variant = config.get("variant").and_then(|v| v.as_str());
        if arch != want_arch || want_variant.is_some_and(|v| Some(v) != variant) {
            return Err(RegistryError::Platform(format!("manifest image architecture: {arch:?} doesn't match requested architecture: {req:?}")));
        }
    }
    let cfg = config.get("config");
    let labels: BTreeMap<String, String> = cfg
        .and_then(|c| c.get("Labels"))
        .and_then(|l| serde_json::from_value(l.clone()).ok())
        .unwrap_or_default();
    for key in ["containers.bootc", "ostree.bootable"] {
        if labels.get(key).is_some_and(|v| v == "1" || v == "true") {
            return Err(RegistryError::Bootc(format!("{key}={}", labels[key])));
        }
    }
    Ok(cfg
        .and_then(|c| c.get("Env"))
        .and_then(|e| serde_json::from_value(e.clone()).ok())
        .unwrap_or_default())
}

/// Pulls the manifest (choosing a platform from an index) and the config.
pub async fn resolve(endpoint: &str, opts: &RegistryOptions) -> Result<Image, RegistryError> {
    let reference = parse_endpoint(endpoint)?;
    let shown = format!("docker://{}", reference.whole());
    let (reg, raw) = first_serving(opts, &reference).await?;
    let top_digest = ferrydisk_common::checksum::sha256_digest(&raw);
    let manifest = parse_manifest(&raw, &format!("of {shown}"))?;
    let requested = opts.arch.clone();
    let want = requested.clone().unwrap_or_else(|| node_arch().to_string());
    let mut platforms = Vec::new();
    let manifest = match manifest {
        OciManifest::Image(m) => m,
        OciManifest::ImageIndex(index) => {
            let entries: Vec<PlatformEntry> = index
                .manifests
                .iter()
                .filter_map(|e| {
                    e.platform.as_ref().map(|p| PlatformEntry {
                        os: p.os.to_string(),
                        arch: p.architecture.to_string(),
                        variant: p.variant.clone(),
                        digest: e.digest.clone(),
                    })
                })
                .collect();
            platforms = entries
                .iter()
                .map(|e| match &e.variant {
                    Some(v) => format!("{}/{}/{v}", e.os, e.arch),
                    None => format!("{}/{}", e.os, e.arch),
                })
                .collect();
            let entry = select_platform(&entries, &want)?;
            tracing::info!(image = %shown, platform = %format!("linux/{want}"), digest = %entry.digest, "selected platform from image index");
            match pull_manifest(&reg, &entry.digest).await? {
                OciManifest::Image(m) => m,
                OciManifest::ImageIndex(_) => return Err(pull_err("nested image index")),
            }
        }
    };
    let artifact_type = manifest.artifact_type.clone().or_else(|| {
        (!super::image::is_image_config(&manifest.config.media_type))
            .then(|| manifest.config.media_type.clone())
    });
    let config = pull_config(&reg, &manifest.config).await?;
    // An artifact's config is no image config (often `{}`): no platform, no Env.
    let env = match &artifact_type {
        None => check_config(&config, requested.as_deref())?,
        Some(t) => {
            tracing::info!(image = %shown, artifact_type = %t, "the manifest is an OCI artifact");
            Vec::new()
        }
    };
    let arch = config
        .get("architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    tracing::info!(image = %shown, layers = manifest.layers.len(), architecture = arch, "resolved image");
    let config_labels = config
        .pointer("/config/Labels")
        .and_then(|l| l.as_object())
        .map(|l| {
            l.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(Image {
        top_digest,
        platforms,
        config_labels,
        rt: tokio::runtime::Handle::current(),
        reg: Arc::new(reg),
        manifest,
        env,
        artifact_type,
        shown,
        retries: opts.retries,
        idle_timeout: opts.idle_timeout,
    })
}

/// The digest of the image's top-level manifest (an index for a multi-arch image), as
/// CDI's DataImportCron poller computes it (containers/image `manifest.Digest`: sha256 of
/// the manifest bytes as the registry serves them).
pub async fn manifest_digest(
    endpoint: &str,
    opts: &RegistryOptions,
) -> Result<String, RegistryError> {
    let reference = parse_endpoint(endpoint)?;
    let (_, raw) = first_serving(opts, &reference).await?;
    Ok(ferrydisk_common::checksum::sha256_digest(&raw))
}

/// The config blob: at most 4 MiB, exactly its descriptor's size (nothing past it is
/// read), its digest checked.
async fn pull_config(
    reg: &Registry,
    desc: &OciDescriptor,
) -> Result<serde_json::Value, RegistryError> {
    if desc.size > MAX_CONFIG || desc.size < 0 {
        return Err(RegistryError::Config(format!(
            "config blob of {} bytes",
            desc.size
        )));
    }
    let buf = reg.small_blob(&desc.digest, desc.size as u64).await?;
    serde_json::from_slice(&buf).map_err(|e| RegistryError::Config(e.to_string()))
}

impl super::image::ContainerImage for Image {
    fn top_digest(&self) -> Option<&str> {
        Some(&self.top_digest)
    }
    fn platforms(&self) -> &[String] {
        &self.platforms
    }
    fn config_labels(&self) -> std::collections::BTreeMap<String, String> {
        self.config_labels.clone()
    }
    fn describe(&self) -> &str {
        &self.shown
    }
    fn env(&self) -> &[String] {
        &self.env
    }
    fn layer_count(&self) -> usize {
        self.manifest.layers.len()
    }
    fn layer_size(&self, idx: usize) -> u64 {
        u64::try_from(self.manifest.layers[idx].size).unwrap_or(0)
    }
    fn layer_info(&self, idx: usize) -> super::image::LayerInfo<'_> {
        let l = &self.manifest.layers[idx];
        super::image::LayerInfo {
            media_type: &l.media_type,
            digest: Some(&l.digest),
            title: l
                .annotations
                .as_ref()
                .and_then(|a| a.get("org.opencontainers.image.title"))
                .map(String::as_str),
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
    ) -> std::io::Result<Box<dyn std::io::Read + Send + '_>> {
        Ok(Box::new(self.layer(idx, progress)?))
    }
}

impl Image {
    /// Starts streaming layer `idx` (resumed with Range after drops by the shared pump);
    /// the reader checks the layer's digest over every byte and fails at its end on a
    /// mismatch.
    pub fn layer(
        &self,
        idx: usize,
        progress: Arc<Progress>,
    ) -> std::io::Result<DigestReader<ChannelReader>> {
        let desc = self.manifest.layers[idx].clone();
        let (tx, reader) = stream::channel();
        let verified = DigestReader::new(reader, &desc.digest).map_err(|e| {
            SourceError::new(
                ErrorKind::UnsupportedFormat,
                format!("layer {}: {e}", desc.digest),
            )
            .into_io()
        })?;
        let policy = Policy {
            retries: self.retries,
            idle_timeout: self.idle_timeout,
            progress,
        };
        let labels = Labels {
            what: format!("failed to pull image: layer {}", desc.digest),
            total: u64::try_from(desc.size).ok(),
            interrupted: "layer download interrupted, resuming",
        };
        let source = LayerSource {
            reg: self.reg.clone(),
            digest: desc.digest,
        };
        self.rt.spawn(pump::run(source, None, policy, labels, tx));
        Ok(verified)
    }
}

/// A blob, reopened at an offset with a Range request; blobs are content-addressed, so
/// no validator is needed (the digest check covers the splice).
struct LayerSource {
    reg: Arc<Registry>,
    digest: String,
}

impl Resumable for LayerSource {
    async fn reopen(&mut self, offset: u64) -> Result<Opened, Reopen> {
        let resp = self
            .reg
            .blob_from(&self.digest, offset)
            .await
            .map_err(|e| match e.kind() {
                ErrorKind::Network => Reopen::Retry(e.to_string()),
                k => Reopen::Fatal(k, e.to_string()),
            })?;
        let partial = resp.status() == reqwest::StatusCode::PARTIAL_CONTENT;
        if partial {
            let starts = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if starts != Some(offset) {
                return Err(Reopen::Retry(format!(
                    "blob {}: asked for bytes from {offset}, the registry answered another range",
                    self.digest
                )));
            }
        }
        // No range support: the blob starts over; the pump skips what it has.
        let skip = if partial { 0 } else { offset };
        let body: Body = Box::pin(
            resp.bytes_stream()
                .map(|r| r.map_err(|e| pump::Broken(crate::net::describe(&e).1))),
        );
        Ok(Opened { body, skip })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let r = parse_endpoint("docker://127.0.0.1:5000/cd/fedora:41").expect("ref");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "cd/fedora");
        assert_eq!(r.tag(), Some("41"));
        assert!(parse_endpoint("oci-archive:/x.tar").is_err());
        assert!(parse_endpoint("127.0.0.1:5000/x").is_err());
    }

    #[test]
    fn auth_file_lookup() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("auth.json");
        std::fs::write(&p, r#"{"auths":{"https://reg.example:5000/v1/":{"auth":"dTpwdw=="},"index.docker.io":{"username":"a","password":"b"}}}"#).expect("write");
        assert_eq!(
            auth_file_entry(&p, "reg.example:5000"),
            Some(("u".into(), "pw".into()))
        );
        assert_eq!(
            auth_file_entry(&p, "docker.io"),
            Some(("a".into(), "b".into()))
        );
        assert_eq!(auth_file_entry(&p, "other"), None);
    }

    #[test]
    fn config_checks() {
        let cfg = serde_json::json!({"architecture": "amd64", "config": {"Env": ["KUBEVIRT_IO_X=1"], "Labels": {"containers.bootc": "1"}}});
        assert!(matches!(
            check_config(&cfg, None),
            Err(RegistryError::Bootc(_))
        ));
        let cfg = serde_json::json!({"architecture": "arm64", "variant": "v8", "config": {"Env": ["KUBEVIRT_IO_X=1"]}});
        assert_eq!(
            check_config(&cfg, Some("arm64/v8")).expect("match"),
            vec!["KUBEVIRT_IO_X=1".to_string()]
        );
        assert!(matches!(
            check_config(&cfg, Some("amd64")),
            Err(RegistryError::Platform(_))
        ));
        assert!(
            check_config(&cfg, None).is_ok(),
            "no request: no check, as CDI"
        );
    }
}
