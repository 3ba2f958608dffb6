//! `importer import`: the CDI importer's main flow (docs/cdi-contract.md section 1.5): pick the
//! source, open it, hand it to the blocking write half in `disk.rs`.

use crate::config::import::{ImportConfig, SourceKind};
use crate::destination::Destination;
use crate::disk::{blocking, write_image, write_stream};
use crate::failure::Failure;
use crate::sources::image::ContainerImage;
use crate::sources::{gcs, http, local_image, node, redact, registry, s3};
use crate::transfer::{connect_err, download, http_client, http_options};
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::stream::CountingReader;
use ferrydisk_common::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::Instrument;

/// Runs the import inside one span naming the source and the (redacted) endpoint;
/// `Ok(None)` is a success that writes no termination message.
pub async fn run(
    plan: ImportConfig,
    progress: Arc<Progress>,
) -> Result<Option<TerminationMessage>, Failure> {
    let span = tracing::info_span!(
        "import",
        source = plan.source.name(),
        endpoint = %redact::url(&plan.endpoint),
    );
    run_in_span(plan, progress).instrument(span).await
}

async fn run_in_span(
    plan: ImportConfig,
    progress: Arc<Progress>,
) -> Result<Option<TerminationMessage>, Failure> {
    let done_file = plan.node.done_file.clone();
    let msg = match plan.source {
        SourceKind::Blank => return plan.disk.create_blank(),
        SourceKind::Http => import_http(plan, progress).await?,
        SourceKind::Registry => import_registry(plan, progress).await?,
        SourceKind::S3 => import_s3(plan, progress).await?,
        SourceKind::Gcs => import_gcs(plan, progress).await?,
        SourceKind::Imageio => {
            tracing::info!(source = "imageio", endpoint = %redact::url(&plan.endpoint), disk = %plan.imageio.disk_id, dest = %plan.disk.dest.path().display(), "starting import");
            let client = http_client(&plan.net, "imageio", Vec::new())?;
            crate::sources::imageio::import(plan, client, progress).await?
        }
        SourceKind::Unsupported(source) => {
            return Err(Failure::Connect {
                source_name: source.into(),
                kind: ErrorKind::UnsupportedFormat,
                message: format!("the {source} source is not supported by ferrydisk"),
            });
        }
    };
    if let Some(done) = done_file {
        // CDI creates it O_EXCL and only logs a failure.
        if let Err(e) = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&done)
        {
            tracing::warn!(path = %done.display(), error = %e, "could not create done file");
        }
    }
    Ok(Some(msg))
}

async fn import_http(
    plan: ImportConfig,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let endpoint = node::endpoint(&plan.endpoint, &plan.node).await?;
    if let Some(path) = local_path(&endpoint) {
        if !plan.allow_local_files {
            return Err(connect_err(
                "http",
                ErrorKind::Config,
                "file:// endpoints need --allow-local-files (a flag, so a DataVolume's URL cannot read the importer pod's files)".into(),
            ));
        }
        return import_file(plan, &path, progress).await;
    }
    let net = &plan.net;
    let client = http_client(net, "http", Vec::new())?;
    let auth = match &net.credentials {
        Some((u, p)) => http::Auth::Basic(u.clone(), p.clone()),
        None => http::Auth::None,
    };
    tracing::info!(source = "http", endpoint = %redact::url(&endpoint), dest = %plan.disk.dest.path().display(), "starting import");
    let opts = http_options(net, "http", auth, progress.clone())?;
    let node_pull = plan.node.enabled;
    let mut msg = download(plan.disk, &client, &endpoint, opts, "http", MAX_RESTARTS).await?;
    if node_pull {
        msg.labels = node::labels(&client, &endpoint).await;
    }
    Ok(msg)
}

/// `IMPORTER_SOURCE=s3`: the object's URL and a SigV4 signer (anonymous without keys),
/// then the HTTP download with `If-Match` resumes. A replaced object is refused, not
/// imported again: the DataVolume named the object it saw.
async fn import_s3(
    plan: ImportConfig,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let net = &plan.net;
    let object = s3::resolve(
        &plan.endpoint,
        plan.s3.region.as_deref(),
        plan.s3.addressing,
    )
    .map_err(|e| connect_err("s3", ErrorKind::Config, e.to_string()))?;
    let host = object.url.host_str().unwrap_or("").to_string();
    let client = http_client(net, "s3", vec![host])?;
    let auth = match &net.credentials {
        Some((k, s)) => http::Auth::Per(Arc::new(s3::SigV4 {
            access_key: k.clone(),
            secret_key: s.clone(),
            region: object.region.clone(),
            session_token: plan.s3.session_token.clone(),
        })),
        None => http::Auth::None,
    };
    let signed = !matches!(auth, http::Auth::None);
    tracing::info!(source = "s3", bucket = %object.bucket, key = %object.key, url = %object.url, region = %object.region, signed, dest = %plan.disk.dest.path().display(), "starting import");
    let opts = http::HttpOptions {
        if_match: true,
        what: Some(format!("download of s3 object {}", object.shown())),
        ..http_options(net, "s3", auth, progress)?
    };
    download(plan.disk, &client, object.url.as_str(), opts, "s3", 0).await
}

/// `IMPORTER_SOURCE=gcs`: the object URL, a bearer token from the service-account key
/// when one is mounted (anonymous otherwise), then the HTTP download with `If-Match`.
async fn import_gcs(
    plan: ImportConfig,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let net = &plan.net;
    let url = gcs::object_url(&plan.endpoint)
        .map_err(|e| connect_err("gcs", ErrorKind::Config, e.to_string()))?;
    let client = http_client(net, "gcs", Vec::new())?;
    let auth = match plan.gcs_credentials.as_deref() {
        Some(path) => {
            let sa = gcs::ServiceAccount::load(path, client.reqwest.clone(), net.idle_timeout)
                .map_err(|e| connect_err("gcs", ErrorKind::Config, e.to_string()))?;
            tracing::info!(account = %sa.email(), "using the GCS service-account key");
            http::Auth::Per(Arc::new(sa))
        }
        None => http::Auth::None,
    };
    tracing::info!(source = "gcs", url = %redact::url(url.as_str()), dest = %plan.disk.dest.path().display(), "starting import");
    let opts = http::HttpOptions {
        if_match: true,
        what: Some(format!(
            "download of gcs object {}",
            redact::url(url.as_str())
        )),
        credentials_hint: " (check the service-account key in GOOGLE_APPLICATION_CREDENTIALS, or that the object is public)",
        ..http_options(net, "gcs", auth, progress)?
    };
    download(plan.disk, &client, url.as_str(), opts, "gcs", 0).await
}

/// How often an import starts again from byte 0 because its source changed under a
/// resume, before it fails.
const MAX_RESTARTS: u32 = 3;

/// `file:///path` (a local user's disk, or a volume mounted into the pod).
fn local_path(endpoint: &str) -> Option<PathBuf> {
    let url = reqwest::Url::parse(endpoint).ok()?;
    (url.scheme() == "file").then(|| url.to_file_path().ok())?
}

/// A local file streams through the same pipeline, and is also handed to it as a file:
/// formats whose data precedes its tables read it again instead of spooling.
async fn import_file(
    plan: ImportConfig,
    path: &Path,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let file = std::fs::File::open(path).map_err(|e| Failure::Connect {
        source_name: "http".into(),
        kind: ErrorKind::SourceRefused,
        message: format!("opening {}: {e}", path.display()),
    })?;
    let len = file.metadata().ok().map(|m| m.len());
    progress.set_source_total(len);
    let again = file.try_clone().map_err(|e| Failure::Process {
        kind: ErrorKind::Io,
        message: format!("reopening {}: {e}", path.display()),
    })?;
    tracing::info!(source = "file", path = %path.display(), dest = %plan.disk.dest.path().display(), "starting import");
    let counter = progress.clone();
    let reader = CountingReader::new(file, move |n| counter.add_source(n));
    blocking(move || {
        write_stream(
            &plan.disk,
            reader,
            len,
            progress,
            Some(Arc::new(again)),
            false,
        )
    })
    .await
}

async fn import_registry(
    plan: ImportConfig,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    if matches!(plan.disk.dest, Destination::Dir(_)) {
        return Err(Failure::Config(
            "registry imports require content type kubevirt".into(),
        ));
    }
    tracing::info!(source = "registry", endpoint = %plan.endpoint, dest = %plan.disk.dest.path().display(), "starting import");
    let image = open_image(&plan).await?;
    let layer = plan.registry.layer;
    let disk = plan.disk;
    blocking(move || write_image(&disk, image.as_ref(), &layer, progress)).await
}

/// The image the endpoint names: a local layout or archive, else a registry's
/// manifest and config (a platform chosen from an index).
pub async fn open_image(plan: &ImportConfig) -> Result<Box<dyn ContainerImage>, Failure> {
    let opts = plan.registry_options();
    let fail = |e: registry::RegistryError| Failure::Process {
        kind: e.kind(),
        message: e.to_string(),
    };
    Ok(
        match local_image::open(&plan.endpoint, opts.arch.as_deref()).map_err(fail)? {
            Some(local) => Box::new(local),
            None => Box::new(
                registry::resolve(&plan.endpoint, &opts)
                    .await
                    .map_err(fail)?,
            ),
        },
    )
}
