//! `importer push`: a local disk file or volume into a registry, as a containerDisk (a
//! tar layer holding `disk/<name>`, uid/gid 107) or as an OCI artifact whose one layer
//! blob is the disk (KubeVirt's `application/vnd.kubevirt.disk.*` media types). The
//! payload goes up as it is stored (raw or qcow2 stays what it is).
//!
//! It streams: the layer is produced in one forward pass (holes of a sparse file are
//! not read, only counted as zeros) and goes up as one streamed PATCH of 1 MiB pieces
//! (or `--chunk-mib` PATCHes with `Content-Range`) while its digest is computed. A blob
//! the registry already has is not sent again: a first pass computes the layer's digest
//! without uploading (reading the source once more, never storing it), then `HEAD`
//! decides.

pub mod kubevirt;
pub mod layer;
pub mod save;
pub mod spool;
mod streamed;
mod vm;

use crate::cli::PushArgs;
use crate::net::registry::{Access, ApiError as PushError, Connect, Registry};
use bytes::Bytes;
use ferrydisk_common::format::probe;
use ferrydisk_common::sniff::Format;
use layer::{LayerSpec, Layout, Produced};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Bytes per piece handed from the producer to a streamed upload.
const PIECE: usize = 1 << 20;

pub use crate::net::registry::{OCI_INDEX, OCI_MANIFEST};
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

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
}

pub async fn run(args: PushArgs) -> i32 {
    let pushed = if args.disks.is_empty() {
        push(&args)
            .await
            .map(|s| serde_json::to_string(&s).expect("json"))
    } else {
        vm::push(&args)
            .await
            .map(|s| serde_json::to_string(&s).expect("json"))
            .map_err(|e| e.to_string())
    };
    match pushed {
        Ok(s) => {
            println!("{s}");
            0
        }
        Err(e) => {
            tracing::error!("push failed: {e}");
            eprintln!("push failed: {e}");
            1
        }
    }
}

/// Where the push goes: `docker://host[:port]/repo[:tag]` (local layouts and archives:
/// [`save::Local`]).
struct Dest {
    host: String,
    repo: String,
    tag: String,
}

fn parse_dest(dest: &str) -> Result<Dest, String> {
    let rest = dest
        .strip_prefix("docker://")
        .ok_or_else(|| format!("--dest {dest:?} must be docker://host[:port]/repo[:tag]"))?;
    let r = crate::sources::reference::parse(rest).map_err(|e| format!("--dest {dest:?}: {e}"))?;
    if r.digest().is_some() {
        return Err(format!("--dest {dest:?}: a push needs a tag, not a digest"));
    }
    let host = match r.resolve_registry() {
        "index.docker.io" => "registry-1.docker.io".to_string(),
        h => h.to_string(),
    };
    Ok(Dest {
        host,
        repo: r.repository().to_string(),
        tag: r.tag().unwrap_or("latest").to_string(),
    })
}

/// The layer's media type: KubeVirt's one disk type for an artifact (raw+zstd), OCI's
/// tar types for a containerDisk.
fn media_type(spec: &LayerSpec, format: Format) -> Result<String, String> {
    let z = if spec.zstd.is_some() { "+zstd" } else { "" };
    match spec.layout {
        Layout::ContainerDisk => Ok(format!("application/vnd.oci.image.layer.v1.tar{z}")),
        Layout::Artifact if format == Format::Raw && spec.zstd.is_some() => {
            Ok(kubevirt::DISK_MEDIA_TYPE.to_string())
        }
        Layout::Artifact => Err(format!(
            "a KubeVirt VM artifact holds raw disks compressed with zstd; this layer would be {}{z}",
            format.name()
        )),
    }
}

/// The settings a KubeVirt VM artifact needs: raw, zstd. Any source format is converted
/// to raw on the way (no flag needed); asking for qcow2 is refused.
fn to_spec(args: &PushArgs) -> Result<Option<PushArgs>, kubevirt::ArtifactError> {
    if args.layout != Layout::Artifact {
        return Ok(None);
    }
    kubevirt::check_volume_name(&args.volume_name)?;
    if args.convert == "qcow2" {
        return Err(kubevirt::ArtifactError::NotRaw);
    }
    // `--vm` is read here, once; a VM push has loaded it already.
    let load = args.vm_object.is_none() && args.vm.is_some();
    let spec = args.convert == "raw" && args.zstd;
    if spec && !load {
        return Ok(None);
    }
    if !spec {
        tracing::info!("a KubeVirt VM artifact's disk layer is raw+zstd: converting to raw and compressing with zstd");
    }
    let vm_object = match (&args.vm, load) {
        (Some(path), true) => Some(kubevirt::load_vm(path)?),
        _ => args.vm_object.clone(),
    };
    Ok(Some(PushArgs {
        convert: "raw".into(),
        zstd: true,
        vm_object,
        ..args.clone()
    }))
}

/// The source's length: a file's size, a block device's capacity.
fn source_len(f: &mut File) -> io::Result<u64> {
    let len = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(len)
}

/// What `push` needs to know of its source, found before anything is sent.
pub struct Source {
    pub file: Arc<File>,
    pub len: u64,
    pub shown: String,
    pub format: Format,
    pub virtual_size: u64,
    pub spec: LayerSpec,
    pub media: String,
    /// What the config's labels describe: the file itself, or what an import found
    /// in the source it spooled from.
    pub origin: spool::Origin,
}

async fn push(args: &PushArgs) -> Result<Summary, String> {
    if args.source.as_os_str().is_empty() {
        return Err(
            "--source is required (or --disk NAME=SOURCE, repeated, for a VM artifact)".into(),
        );
    }
    push_with(args, None).await
}

/// [`push`], with the labels' origin given (the upload server knows what it received).
pub async fn push_with(
    args: &PushArgs,
    given_origin: Option<spool::Origin>,
) -> Result<Summary, String> {
    let spec_args = to_spec(args).map_err(|e| e.to_string())?;
    let args = spec_args.as_ref().unwrap_or(args);
    let dest = if save::Local::is_local(&args.dest) {
        None
    } else {
        Some(parse_dest(&args.dest)?)
    };
    layer::check_disk_name(&args.disk_name)?;
    let given = args.source.to_string_lossy().to_string();
    // A local raw file converted to raw is already what it would become.
    let local_as_stored = spool::is_path(&given)
        && (args.convert == "keep" || (args.convert == "raw" && is_plain_raw(&args.source)));
    // Into a registry, anything but a local file as stored goes up as it is imported:
    // in one pass when the layout is known before the data (raw), else in two (the
    // first measures). Data out of guest order, or --spool-dir, spools instead.
    if let (Some(d), false) = (&dest, local_as_stored) {
        use streamed::Streamed;
        let mut spool = args.spool_dir.is_some();
        if streamed::applies(args) {
            match streamed::push(args, d, None).await? {
                Streamed::Pushed(s) => return Ok(*s),
                Streamed::OutOfOrder => spool = true,
                Streamed::NoLength | Streamed::NotThere => {}
            }
        }
        if !spool {
            let output = if args.convert == "raw" {
                "raw"
            } else {
                "qcow2"
            };
            match streamed::measure(args, output).await? {
                Some(m) => match streamed::push(args, d, Some((output, m))).await? {
                    Streamed::Pushed(s) => return Ok(*s),
                    Streamed::OutOfOrder | Streamed::NoLength | Streamed::NotThere => {}
                },
                None => tracing::info!(
                    "the source's data is not in guest order: the push spools instead"
                ),
            }
        }
    }
    // Anything but a local file as stored is imported into the spool first.
    let spooled = if local_as_stored {
        None
    } else {
        let output = if args.convert == "raw" {
            "raw"
        } else {
            "qcow2"
        };
        Some(spool::import(args, output).await?)
    };
    let args = &with_source_env(args, spooled.as_ref().map_or(&[][..], |s| &s.env[..]));
    let path = match &spooled {
        Some(s) => s.disk.clone(),
        None => args.source.clone(),
    };
    let shown = given;
    let mut file = File::open(&path).map_err(|e| format!("opening {shown}: {e}"))?;
    let len = source_len(&mut file).map_err(|e| format!("sizing {shown}: {e}"))?;
    let probed = probe::probe(&mut file).map_err(|e| format!("{shown}: {e}"))?;
    let spec = LayerSpec {
        layout: args.layout,
        disk_name: args.disk_name.clone(),
        zstd: args.zstd.then_some((args.zstd_level, zstd_threads())),
    };
    let media = media_type(&spec, probed.format)?;
    tracing::info!(source = %shown, format = probed.format.name(), virtual_size = probed.virtual_size, source_size = len, layout = ?args.layout, media_type = %media, dest = %args.dest, "pushing");
    let origin = match (&spooled, given_origin) {
        (Some(s), _) => s.origin.clone(),
        (None, Some(o)) => o,
        (None, None) => spool::Origin {
            format: probed.format.name().to_string(),
            virtual_size: probed.virtual_size,
            source_size: len,
        },
    };
    let src = Source {
        file: Arc::new(file),
        len,
        shown,
        format: probed.format,
        virtual_size: probed.virtual_size,
        spec,
        media,
        origin,
    };
    // (the spool, if any, is removed when `spooled` drops, after the push)
    match dest {
        Some(dest) => push_registry(args, &dest, src).await,
        None => {
            let local = save::Local::parse(&args.dest)?;
            tokio::task::spawn_blocking({
                let args = args.clone();
                move || save::save(&args, &local, src)
            })
            .await
            .map_err(|e| format!("save task: {e}"))?
        }
    }
}

/// Whether a local file or device holds a raw disk as it is (not a format, not
/// compressed), by the importer's own sniffing.
fn is_plain_raw(path: &std::path::Path) -> bool {
    use ferrydisk_common::sniff::{sniff, SNIFF_LEN};
    let mut head = [0u8; SNIFF_LEN];
    File::open(path)
        .and_then(|mut f| ferrydisk_common::stream::read_full(&mut f, &mut head))
        .is_ok_and(|got| sniff(&head[..got]) == Format::Raw)
}

/// `args` with the source's `KUBEVIRT_IO_` Env entries added, unless `--env` sets the
/// same key.
fn with_source_env(args: &PushArgs, source_env: &[String]) -> PushArgs {
    let mut args = args.clone();
    for e in source_env {
        let key = e.split_once('=').map_or(e.as_str(), |(k, _)| k);
        if !args
            .env
            .iter()
            .any(|x| x.split_once('=').is_some_and(|(k, _)| k == key))
        {
            args.env.push(e.clone());
        }
    }
    args
}

async fn push_registry(args: &PushArgs, dest: &Dest, src: Source) -> Result<Summary, String> {
    let Source {
        file,
        len,
        shown,
        spec,
        ..
    } = &src;
    let (len, shown) = (*len, shown.as_str());
    let platforms = platforms(args)?;
    let reg = connect(args, dest).await?;

    // Pass one: the digest, so a blob the registry has is not sent again.
    let pre = {
        let (f, s) = (file.clone(), spec.clone());
        tokio::task::spawn_blocking(move || {
            layer::produce(&mut SkipHoles::new(&f, len), len, &s, io::sink()).map(|(_, p)| p)
        })
        .await
        .expect("layer task")
        .map_err(|e| format!("reading {shown}: {e}"))?
    };
    let mut mounted = false;
    let uploaded = if reg
        .blob_exists(&pre.digest, pre.size)
        .await
        .map_err(|e| chain(&e))?
    {
        tracing::info!(digest = %pre.digest, "the registry has this layer; not uploading it");
        false
    } else if let Some(from) = args.mount_from.as_deref().filter(|f| !f.is_empty()) {
        mounted = reg.mount(&pre.digest, from).await.map_err(|e| chain(&e))?;
        if mounted {
            tracing::info!(digest = %pre.digest, from, "layer mounted from another repository; not uploading it");
            false
        } else {
            tracing::info!(digest = %pre.digest, from, "the registry did not mount the layer; uploading it");
            upload_checked(args, &reg, &src, &pre).await?
        }
    } else {
        upload_checked(args, &reg, &src, &pre).await?
    };

    let manifest_digest = put_image(args, dest, &reg, &src, &pre).await?;
    let reference = format!("{}/{}:{}", dest.host, dest.repo, dest.tag);
    tracing::info!(%reference, digest = %manifest_digest, layer = %pre.digest, uploaded, mounted, platforms = platforms.len(), "pushed");
    let mut s = summary(reference, manifest_digest, pre, uploaded, &src);
    s.layer_mounted = mounted;
    Ok(s)
}

/// The registry client for `dest`, authenticated.
async fn connect(args: &PushArgs, dest: &Dest) -> Result<Registry, String> {
    let http = crate::sources::client::build(&crate::sources::client::ClientOptions {
        ca_dirs: args.cert_dir.iter().map(|p| p.as_path()).collect(),
        insecure: args.insecure(),
        http_proxy: None,
        https_proxy: None,
        no_proxy: None,
        localhost_names: Vec::new(),
    })
    .map_err(|e| e.to_string())?;
    let creds = crate::sources::registry::credentials(
        args.access_key_id.as_deref(),
        args.secret_key.as_deref(),
        args.auth_file.as_deref(),
        &dest.host,
    );
    Registry::connect(Connect {
        http,
        host: dest.host.clone(),
        repo: dest.repo.clone(),
        creds,
        insecure: args.insecure(),
        access: Access::PullPush,
        idle: std::time::Duration::from_secs(args.idle_timeout.max(1)),
    })
    .await
    .map_err(|e| format!("{}: {}", dest.host, chain(&e)))
}

/// Once the layer is in: the configs, the manifests (and index), the tag last. Returns
/// the digest the tag points at.
async fn put_image(
    args: &PushArgs,
    dest: &Dest,
    reg: &Registry,
    src: &Source,
    pre: &Produced,
) -> Result<String, String> {
    if args.layer_only {
        // One disk of a VM artifact: its manifest names every disk (`vm.rs`).
        return Ok(String::new());
    }
    let blobs = image_blobs(args, src, pre)?;
    for (_, config) in &blobs.configs {
        reg.put_small_blob(config.clone())
            .await
            .map_err(|e| chain(&e))?;
    }
    let manifest_digest = match &blobs.index {
        None => {
            let (_, body) = &blobs.manifests[0];
            reg.put_manifest(&dest.tag, OCI_MANIFEST, body.clone())
                .await
                .map_err(|e| chain(&e))?
        }
        Some((_, index)) => {
            // The platforms' manifests by digest first, then the index under the tag.
            for (digest, body) in &blobs.manifests {
                reg.put_manifest(digest, OCI_MANIFEST, body.clone())
                    .await
                    .map_err(|e| chain(&e))?;
            }
            reg.put_manifest(&dest.tag, OCI_INDEX, index.clone())
                .await
                .map_err(|e| chain(&e))?
        }
    };
    Ok(manifest_digest)
}

/// Pass two, and the check that the source did not change since pass one.
async fn upload_checked(
    args: &PushArgs,
    reg: &Registry,
    src: &Source,
    pre: &Produced,
) -> Result<bool, String> {
    {
        let got = upload_layer(
            reg,
            src.file.clone(),
            src.len,
            &src.spec,
            pre.size,
            args.chunk_mib.map(|m| (m as usize) << 20),
            args.retries,
        )
        .await
        .map_err(|e| chain(&e))?;
        if &got != pre {
            return Err(format!(
                "{} changed while it was pushed (layer {} then {})",
                src.shown, pre.digest, got.digest
            ));
        }
    }
    Ok(true)
}

/// The descriptor a tag points at: (media type, digest, size).
pub type Top = (&'static str, String, usize);

/// The image's small blobs, each as (digest, bytes): one config and one manifest per
/// platform, and an index when there are several platforms.
pub struct ImageBlobs {
    pub configs: Vec<(String, Bytes)>,
    pub manifests: Vec<(String, Bytes)>,
    pub index: Option<(String, Bytes)>,
}

impl ImageBlobs {
    /// What the tag points at: the index, else the one manifest.
    pub fn top(&self) -> Top {
        match &self.index {
            Some((d, b)) => (OCI_INDEX, d.clone(), b.len()),
            None => (
                OCI_MANIFEST,
                self.manifests[0].0.clone(),
                self.manifests[0].1.len(),
            ),
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &(String, Bytes)> {
        self.configs
            .iter()
            .chain(&self.manifests)
            .chain(self.index.as_ref())
    }
}

/// Builds [`ImageBlobs`] for the platforms `--arch` names.
pub fn image_blobs(args: &PushArgs, src: &Source, pre: &Produced) -> Result<ImageBlobs, String> {
    use ferrydisk_common::checksum::sha256_digest;
    let platforms = platforms(args)?;
    let mut blobs = ImageBlobs {
        configs: Vec::new(),
        manifests: Vec::new(),
        index: None,
    };
    let mut entries = Vec::new();
    for (arch, variant) in &platforms {
        let (config_media, config) = config_blob(args, src, pre, arch, variant.as_deref());
        let config_digest = sha256_digest(&config);
        let manifest = manifest_blob(args, src, pre, config_media, &config_digest, config.len());
        let digest = sha256_digest(&manifest);
        entries.push(index_entry(
            &digest,
            manifest.len(),
            arch,
            variant.as_deref(),
        ));
        blobs.configs.push((config_digest, config));
        blobs.manifests.push((digest, manifest));
    }
    if args.layout == Layout::Artifact {
        let index = kubevirt::index(entries, &kubevirt::created_now());
        let index = Bytes::from(serde_json::to_vec(&index).expect("json"));
        blobs.index = Some((sha256_digest(&index), index));
    } else if platforms.len() > 1 {
        let index = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": entries,
            }))
            .expect("json"),
        );
        blobs.index = Some((sha256_digest(&index), index));
    }
    Ok(blobs)
}

/// `--arch amd64,arm64/v8` as (architecture, variant) pairs.
pub fn platforms(args: &PushArgs) -> Result<Vec<(String, Option<String>)>, String> {
    let list: Vec<(String, Option<String>)> = args
        .arch
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| match a.split_once('/') {
            Some((arch, v)) => (arch.to_string(), Some(v.to_string())),
            None => (a.to_string(), None),
        })
        .collect();
    if list.is_empty() {
        return Err("--arch names no architecture".into());
    }
    if list.len() > 1 && args.layout == Layout::Artifact {
        return Err(
            "a multi-arch index is made of container images: use --layout containerdisk".into(),
        );
    }
    Ok(list)
}

/// An index entry for one platform's manifest.
pub fn index_entry(
    digest: &str,
    size: usize,
    arch: &str,
    variant: Option<&str>,
) -> serde_json::Value {
    let mut platform = serde_json::json!({"architecture": arch, "os": "linux"});
    if let Some(v) = variant {
        platform["variant"] = v.into();
    }
    serde_json::json!({
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": size,
        "platform": platform,
    })
}

fn summary(
    reference: String,
    manifest_digest: String,
    pre: Produced,
    uploaded: bool,
    src: &Source,
) -> Summary {
    Summary {
        reference,
        manifest_digest,
        layer_digest: pre.digest,
        layer_size: pre.size,
        layer_media_type: src.media.clone(),
        layer_uploaded: uploaded,
        layer_mounted: false,
        format: src.format.name().to_string(),
        source_format: src.origin.format.clone(),
        virtual_size: src.virtual_size,
        source_size: src.origin.source_size,
    }
}

/// The image config: a container image's for a containerDisk (Deckhouse's labels,
/// the layer's diff_id), OCI's empty config for an artifact.
pub fn config_blob(
    args: &PushArgs,
    src: &Source,
    pre: &Produced,
    arch: &str,
    variant: Option<&str>,
) -> (&'static str, Bytes) {
    let (media, config) = match args.layout {
        Layout::ContainerDisk => {
            let mut c = serde_json::json!({
                "architecture": arch,
                "os": "linux",
                "config": {"Labels": labels(&src.origin)},
                "rootfs": {"type": "layers", "diff_ids": [pre.diff_id]},
                "history": [{"created_by": format!("ferrydisk push: disk/{}", args.disk_name)}],
            });
            if let Some(v) = variant {
                c["variant"] = v.into();
            }
            if !args.env.is_empty() {
                c["config"]["Env"] = args.env.clone().into();
            }
            (OCI_CONFIG, c)
        }
        Layout::Artifact => (
            kubevirt::CONFIG_MEDIA_TYPE,
            kubevirt::vm_config(args.vm_object.as_ref(), &[args.volume_name.as_str()]),
        ),
    };
    (
        media,
        Bytes::from(serde_json::to_vec(&config).expect("json")),
    )
}

/// The OCI image manifest naming the config and the one layer.
pub fn manifest_blob(
    args: &PushArgs,
    src: &Source,
    pre: &Produced,
    config_media: &str,
    config_digest: &str,
    config_size: usize,
) -> Bytes {
    let mut layer_desc = serde_json::json!({
        "mediaType": src.media, "digest": pre.digest, "size": pre.size,
    });
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_media, "digest": config_digest, "size": config_size},
    });
    if args.layout == Layout::Artifact {
        layer_desc["annotations"] = kubevirt::layer_annotations(
            &args.volume_name,
            src.virtual_size,
            &src.origin.format,
            src.origin.source_size,
        );
        manifest["artifactType"] = serde_json::json!(kubevirt::ARTIFACT_TYPE);
    }
    manifest["layers"] = serde_json::json!([layer_desc]);
    Bytes::from(serde_json::to_vec(&manifest).expect("json"))
}

/// An error and its causes in one line (reqwest names the TLS failure only in a source).
fn chain(e: &PushError) -> String {
    ferrydisk_common::error::chain_line(e)
}

/// Deckhouse's labels for an image in its registry.
fn labels(o: &spool::Origin) -> serde_json::Value {
    serde_json::json!({
        "source-image-format": o.format,
        "source-image-size": o.source_size.to_string(),
        "source-image-virtual-size": o.virtual_size.to_string(),
    })
}

/// zstd workers: the cores this process may use, less one for hashing and the upload.
fn zstd_threads() -> u32 {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(n.saturating_sub(1)).unwrap_or(0)
}

/// Pass two: the layer produced on a blocking thread into pieces (1 MiB, or the chunk
/// size) that the upload session sends as they come. A cut upload resumes where the
/// registry says it stands: the layer is produced again from the file and the bytes
/// the registry has are not sent again (`--retries` resumptions without progress).
async fn upload_layer(
    reg: &Registry,
    file: Arc<File>,
    len: u64,
    spec: &LayerSpec,
    layer_size: u64,
    chunk: Option<usize>,
    retries: u32,
) -> Result<Produced, PushError> {
    let chunked = chunk.is_some();
    let piece = chunk.unwrap_or(PIECE);
    let producers = std::sync::Mutex::new(Vec::new());
    let produce = |skip: u64| {
        // Chunked: one chunk being sent, one queued. Streamed: a few 1 MiB pieces queued.
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(if chunked { 1 } else { 4 });
        let (dtx, drx) = tokio::sync::oneshot::channel();
        let (s, file) = (spec.clone(), file.clone());
        let producer = tokio::task::spawn_blocking(move || {
            let out = Chunks {
                buf: Vec::new(),
                piece,
                tx,
                skip,
            };
            let made = layer::produce(&mut SkipHoles::new(&file, len), len, &s, out)
                .and_then(|(mut out, p)| out.send().map(|()| p));
            let _ = dtx.send(made.as_ref().ok().map(|p| p.digest.clone()));
            made
        });
        if let Ok(mut p) = producers.lock() {
            p.push(producer);
        }
        (rx, drx)
    };
    let uploaded = reg
        .upload_resumable(produce, layer_size, chunked, retries)
        .await;
    // Only the last producer ran to the end; the others stopped when their upload did.
    let last = producers.lock().ok().and_then(|mut p| p.pop());
    let made = match last {
        Some(h) => Some(h.await.expect("layer task")),
        None => None,
    };
    match (uploaded, made) {
        (Ok(_), Some(Ok(p))) => Ok(p),
        // The upload failed before any layer was asked for (the session was refused).
        (Err(u), None) => Err(u),
        (Ok(_), None) => Err(PushError::Protocol("no layer was produced".into())),
        // A failed upload stops the producer ("the upload stopped", a broken pipe):
        // the upload's own error says why (a registry's 401, say).
        (Err(u), Some(Err(e))) if e.kind() == io::ErrorKind::BrokenPipe => Err(u),
        // The producer's own error says what went wrong on the source side.
        (_, Some(Err(e))) => Err(PushError::Protocol(format!("reading the source: {e}"))),
        (Err(e), Some(Ok(_))) => Err(e),
    }
}

/// Collects the layer into chunks for the uploader.
struct Chunks {
    buf: Vec<u8>,
    piece: usize,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    /// Bytes of the layer the registry has already (a resumed upload): produced and
    /// hashed, not sent.
    skip: u64,
}

impl Chunks {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // The next buffer is allocated when the next write comes, not while this one waits.
        let chunk = std::mem::take(&mut self.buf);
        self.tx
            .blocking_send(Bytes::from(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.skip > 0 {
            let n = data
                .len()
                .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
            self.skip -= n as u64;
            return Ok(n);
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(self.piece);
        }
        let n = data.len().min(self.piece - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.piece {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads a file front to back, answering its holes (SEEK_HOLE/SEEK_DATA) with zeros
/// instead of reading them; a block device, or a file system without hole reporting,
/// is read whole.
pub struct SkipHoles<'a> {
    f: &'a File,
    pos: u64,
    len: u64,
    /// `[pos, data_end)` is known data, `[pos, hole_end)` a known hole.
    data_end: u64,
    hole_end: u64,
}

impl<'a> SkipHoles<'a> {
    pub fn new(f: &'a File, len: u64) -> Self {
        SkipHoles {
            f,
            pos: 0,
            len,
            data_end: 0,
            hole_end: 0,
        }
    }

    /// Classifies the bytes at `pos`.
    fn locate(&mut self) -> io::Result<()> {
        use rustix::fs::{seek, SeekFrom as Whence};
        let data = match seek(self.f, Whence::Data(self.pos)) {
            Ok(d) => d.min(self.len),
            Err(rustix::io::Errno::NXIO) => self.len, // only a hole remains
            Err(_) => {
                self.data_end = self.len;
                return Ok(());
            }
        };
        if data > self.pos {
            self.hole_end = data;
        } else {
            self.data_end = seek(self.f, Whence::Hole(self.pos))
                .map(|h| h.min(self.len))
                .unwrap_or(self.len)
                .max(self.pos + 1);
        }
        Ok(())
    }
}

impl Read for SkipHoles<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.hole_end && self.pos >= self.data_end {
            self.locate()?;
        }
        let limit = |end: u64| {
            buf.len()
                .min(usize::try_from(end - self.pos).unwrap_or(usize::MAX))
        };
        let n = if self.pos < self.hole_end {
            let n = limit(self.hole_end);
            buf[..n].fill(0);
            n
        } else {
            let n = limit(self.data_end);
            self.f.read_at(&mut buf[..n], self.pos)?
        };
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_read_as_zeros_without_reading_them() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("sparse");
        let f = File::create(&p).expect("create");
        f.write_all_at(&[1u8; 4096], 1 << 20).expect("write");
        f.write_all_at(&[2u8; 100], 3 << 20).expect("write");
        f.set_len(5 << 20).expect("len");
        let f = File::open(&p).expect("open");
        let mut got = Vec::new();
        SkipHoles::new(&f, 5 << 20)
            .read_to_end(&mut got)
            .expect("read");
        assert_eq!(got, std::fs::read(&p).expect("read"));
    }

    #[test]
    fn destinations_need_docker_and_a_tag() {
        let d = parse_dest("docker://127.0.0.1:5000/disks/fedora:41").expect("dest");
        assert_eq!(
            (d.host.as_str(), d.repo.as_str(), d.tag.as_str()),
            ("127.0.0.1:5000", "disks/fedora", "41")
        );
        assert_eq!(
            parse_dest("docker://127.0.0.1:5000/d").expect("dest").tag,
            "latest"
        );
        assert!(parse_dest("127.0.0.1:5000/d").is_err());
        assert!(parse_dest("docker://127.0.0.1:5000/d@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef").is_err());
    }
}
