//! [`PushConfig`]: what a push sends, where, and how, checked before anything is read
//! or sent (a bad destination, name, platform list or `--vm` file fails at once).

use crate::cli::{parse_go_bool, Convert, PushArgs, PushOptions};
use crate::config::import;
use crate::push::kubevirt::{self, ArtifactError};
use crate::push::layer::{self, Layout};
use crate::push::target::{self, Dest, Local};
use crate::sources::client::Proxies;
use std::path::PathBuf;
use std::time::Duration;

/// Why a push's settings are refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--source is required (or --disk NAME=SOURCE, repeated, for a VM artifact)")]
    NoSource,
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error("{0}")]
    Dest(#[from] target::DestError),
    #[error("{0} (a VM artifact with several disks goes to a registry)")]
    VmNotToRegistry(target::DestError),
    #[error("{0}")]
    DiskName(#[from] layer::DiskNameError),
    #[error("--arch names no architecture")]
    NoArch,
    #[error("a multi-arch index is made of container images: use --layout containerdisk")]
    MultiArchArtifact,
    #[error("--max-size {value:?}: {message}")]
    MaxSize { value: String, message: String },
}

/// Where the image goes.
#[derive(Debug, Clone)]
pub enum Target {
    Registry(Dest),
    Local(Local),
}

/// What the layer is made of.
#[derive(Debug, Clone)]
pub struct Payload {
    pub convert: Convert,
    pub layout: Layout,
    /// The file name under `disk/` (containerDisk) or the title.
    pub disk_name: String,
    /// zstd level for the layer, or none.
    pub zstd: Option<i32>,
    /// The largest disk a streamed push may send.
    pub max_size: u64,
    /// Spool imported or converted sources here instead of streaming them.
    pub spool_dir: Option<PathBuf>,
}

/// The small blobs around the layer: configs, manifests, index.
#[derive(Debug, Clone)]
pub struct ImageSettings {
    /// `(architecture, variant)`, at least one.
    pub platforms: Vec<(String, Option<String>)>,
    /// The container config's `Env` (`KEY=VALUE`).
    pub env: Vec<String>,
    /// The VM volume an artifact's disk belongs to.
    pub volume_name: String,
    /// The `--vm` object, loaded and checked once.
    pub vm: Option<serde_json::Value>,
    /// The index's `created` time, seconds since 1970 (`SOURCE_DATE_EPOCH`); now if none.
    pub created: Option<u64>,
    /// One disk of a VM artifact: only the layer goes up (`push/vm.rs` writes the
    /// manifest naming every disk).
    pub layer_only: bool,
}

/// How blobs travel.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// PATCH size for a chunked upload; none: one streamed PATCH.
    pub chunk: Option<usize>,
    /// Resumptions without progress before a cut upload fails.
    pub retries: u32,
    pub idle: Duration,
    /// Ask the registry to mount the layer from this repository first.
    pub mount_from: Option<String>,
}

/// How the registries are reached (the destination, and a registry source).
#[derive(Debug, Clone)]
pub struct Access {
    pub credentials: Option<(String, String)>,
    pub auth_file: Option<PathBuf>,
    pub cert_dir: Option<PathBuf>,
    pub insecure: bool,
    pub proxies: Proxies,
}

#[derive(Debug, Clone)]
pub struct PushConfig {
    /// A file, a device, or anything an import reads; empty for a VM push.
    pub source: PathBuf,
    /// A VM artifact's disks, `(volume name, source)`.
    pub disks: Vec<(String, String)>,
    pub target: Target,
    /// How `target` was written (log lines).
    pub dest_shown: String,
    pub payload: Payload,
    pub image: ImageSettings,
    pub transfer: Transfer,
    pub access: Access,
    /// The platform and mirrors for a registry source.
    pub source_registry: import::Registry,
}

impl PushConfig {
    /// `importer push`.
    pub fn from_args(a: PushArgs) -> Result<Self, ConfigError> {
        let disks = disks(&a.disks)?;
        if disks.is_empty() && a.source.as_os_str().is_empty() {
            return Err(ConfigError::NoSource);
        }
        if !disks.is_empty() && !a.source.as_os_str().is_empty() {
            return Err(ArtifactError::SourceAndDisks.into());
        }
        let target = if disks.is_empty() {
            target_of(&a.dest)?
        } else {
            Target::Registry(Dest::parse(&a.dest).map_err(ConfigError::VmNotToRegistry)?)
        };
        let mut options = a.options;
        if !disks.is_empty() {
            options.layout = Layout::Artifact;
        }
        build(a.source, disks, target, a.dest, options)
    }

    /// The upload server's `--push-dest`: the volume `disk` as it was written.
    pub fn for_upload(
        dest: &str,
        disk: PathBuf,
        options: &PushOptions,
    ) -> Result<Self, ConfigError> {
        let mut options = options.clone();
        options.convert = Convert::Keep;
        build(
            disk,
            Vec::new(),
            target_of(dest)?,
            dest.to_string(),
            options,
        )
    }

    /// One disk of this VM push: its layer only, under its volume name.
    pub fn one_disk(&self, name: &str, source: &str) -> Self {
        let mut one = self.clone();
        one.source = source.into();
        one.disks = Vec::new();
        one.image.volume_name = name.to_string();
        one.image.vm = None;
        one.image.layer_only = true;
        one
    }

    pub fn registry(&self) -> Option<&Dest> {
        match &self.target {
            Target::Registry(d) => Some(d),
            Target::Local(_) => None,
        }
    }
}

fn target_of(dest: &str) -> Result<Target, ConfigError> {
    Ok(if Local::is_local(dest) {
        Target::Local(Local::parse(dest)?)
    } else {
        Target::Registry(Dest::parse(dest)?)
    })
}

/// `NAME=SOURCE` pairs, names unique DNS labels.
fn disks(specs: &[String]) -> Result<Vec<(String, String)>, ArtifactError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for d in specs {
        let (name, source) = d
            .split_once('=')
            .filter(|(n, s)| !n.is_empty() && !s.is_empty())
            .ok_or_else(|| ArtifactError::DiskSpec(d.clone()))?;
        kubevirt::check_volume_name(name)?;
        if out.iter().any(|(n, _)| n == name) {
            return Err(ArtifactError::DiskTwice(name.to_string()));
        }
        out.push((name.to_string(), source.to_string()));
    }
    Ok(out)
}

fn build(
    source: PathBuf,
    disks: Vec<(String, String)>,
    target: Target,
    dest_shown: String,
    o: PushOptions,
) -> Result<PushConfig, ConfigError> {
    layer::check_disk_name(&o.disk_name)?;
    let (mut convert, mut zstd) = (o.convert, o.zstd);
    let mut vm = None;
    if o.layout == Layout::Artifact {
        // KubeVirt's VM artifact: raw+zstd. Any source format is converted to raw on the
        // way (no flag needed); asking for qcow2 is refused.
        kubevirt::check_volume_name(&o.volume_name)?;
        if convert == Convert::Qcow2 {
            return Err(ArtifactError::NotRaw.into());
        }
        if convert != Convert::Raw || !zstd {
            tracing::info!("a KubeVirt VM artifact's disk layer is raw+zstd: converting to raw and compressing with zstd");
        }
        (convert, zstd) = (Convert::Raw, true);
        vm = o.vm.as_deref().map(kubevirt::load_vm).transpose()?;
    }
    let max_size = ferrydisk_common::cdi::space::parse_quantity(&o.max_size).map_err(|e| {
        ConfigError::MaxSize {
            value: o.max_size.clone(),
            message: e.to_string(),
        }
    })?;
    let nonempty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    Ok(PushConfig {
        source,
        disks,
        target,
        dest_shown,
        payload: Payload {
            convert,
            layout: o.layout,
            disk_name: o.disk_name,
            zstd: zstd.then_some(o.zstd_level),
            max_size,
            spool_dir: o.spool_dir,
        },
        image: ImageSettings {
            platforms: platforms(&o.arch, o.layout)?,
            env: o.env,
            volume_name: o.volume_name,
            vm,
            created: o.created,
            layer_only: false,
        },
        transfer: Transfer {
            chunk: o.chunk_mib.map(|m| (m as usize) << 20),
            retries: o.retries,
            idle: Duration::from_secs(o.idle_timeout.max(1)),
            mount_from: nonempty(o.mount_from),
        },
        access: Access {
            credentials: nonempty(o.access_key_id).zip(nonempty(o.secret_key)),
            auth_file: o.auth_file,
            cert_dir: o.cert_dir,
            insecure: parse_go_bool(&o.insecure_tls).unwrap_or(false),
            proxies: o.proxy.proxies(),
        },
        source_registry: import::Registry {
            arch: nonempty(o.source_arch),
            registries_conf: o.registries_conf,
            layer: Default::default(),
        },
    })
}

/// `--arch amd64,arm64/v8` as (architecture, variant) pairs.
fn platforms(arch: &str, layout: Layout) -> Result<Vec<(String, Option<String>)>, ConfigError> {
    let list: Vec<(String, Option<String>)> = arch
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| match a.split_once('/') {
            Some((arch, v)) => (arch.to_string(), Some(v.to_string())),
            None => (a.to_string(), None),
        })
        .collect();
    if list.is_empty() {
        return Err(ConfigError::NoArch);
    }
    if list.len() > 1 && layout == Layout::Artifact {
        return Err(ConfigError::MultiArchArtifact);
    }
    Ok(list)
}
