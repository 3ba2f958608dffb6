//! `importer inspect SOURCE`: what an import of SOURCE would find, written nowhere.
//!
//! The whole import runs: the same sources, the same pipeline, the same validation
//! (every table, every compressed cluster, every digest). It writes into a writer that
//! keeps nothing. What a real import would put on the disk is reported instead: layers
//! peeled, format, virtual size, the image's own size, the bytes read, the stream's
//! SHA-256 and, for images, the manifest, platforms, layers, config labels and the
//! labels CDI would put on the PVC. A source an import refuses is refused here, with
//! the same one-line reason and exit 1.

use crate::cli::{InspectArgs, InspectOutput, OutputFormat};
use crate::config::import::{ImportConfig, SourceKind};
use crate::disk::{blocking, write_image, Inspected, Output};
use crate::failure::Failure;
use crate::import;
use crate::sources::image::ContainerImage;
use crate::sources::redact;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::checksum::tap_digest;
use ferrydisk_common::progress::Progress;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The import source type and endpoint SOURCE stands for.
pub(crate) fn classify(source: &str) -> (SourceKind, String) {
    const IMAGE_PREFIXES: [&str; 4] = ["docker://", "oci:", "oci-archive:", "docker-archive:"];
    if IMAGE_PREFIXES.iter().any(|p| source.starts_with(p)) {
        return (SourceKind::Registry, source.to_string());
    }
    if source.contains("://") {
        return (SourceKind::Http, source.to_string());
    }
    // A plain path: a local file.
    let abs = std::path::absolute(source).unwrap_or_else(|_| source.into());
    let url = reqwest::Url::from_file_path(&abs)
        .map(|u| u.to_string())
        .unwrap_or_else(|_| format!("file://{}", abs.display()));
    (SourceKind::Http, url)
}

pub async fn run(args: InspectArgs) -> i32 {
    match inspect(args).await {
        Ok((out, table)) => {
            if table {
                print!("{}", to_table(&out));
            } else {
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            }
            0
        }
        Err(f) => {
            let line = ferrydisk_common::error::one_line(&f.message());
            tracing::error!(class = f.kind().class(), kind = %f.kind(), "inspect failed: {line}");
            eprintln!("inspect failed: {line}");
            1
        }
    }
}

async fn inspect(args: InspectArgs) -> Result<(Value, bool), Failure> {
    let table = args.output == InspectOutput::Table;
    let (source, endpoint) = classify(&args.image);
    let mut a = args.import;
    a.source = source.name().to_string();
    a.endpoint = endpoint;
    // A user's own command: local files are what it is for.
    a.allow_local_files = true;
    a.content_type = "kubevirt".into();
    a.volume.output_format = OutputFormat::Raw;
    let progress = Arc::new(Progress::default());
    let found = Arc::new(Inspected::default());
    let mut plan = ImportConfig::from_args(a)?;
    plan.disk.output = Output::Discard(found.clone());
    let shown = redact::url(&plan.endpoint);
    let (msg, image) = if source == SourceKind::Registry {
        let image = import::open_image(&plan).await?;
        let described = describe_image(image.as_ref());
        let p = progress.clone();
        let (disk, layer) = (plan.disk, plan.registry.layer);
        let msg = blocking(move || write_image(&disk, image.as_ref(), &layer, p)).await?;
        (msg, Some(described))
    } else {
        let msg = import::run(plan, progress.clone())
            .await?
            .unwrap_or_default();
        (msg, None)
    };
    Ok((report(&shown, &found, &progress, &msg, image), table))
}

fn describe_image(image: &dyn ContainerImage) -> Value {
    let layers: Vec<Value> = (0..image.layer_count())
        .map(|i| {
            let info = image.layer_info(i);
            let mut l = Map::new();
            l.insert("media-type".into(), info.media_type.into());
            l.insert("size".into(), image.layer_size(i).into());
            if let Some(d) = info.digest {
                l.insert("digest".into(), d.into());
            }
            if let Some(t) = info.title {
                l.insert("title".into(), t.into());
            }
            Value::Object(l)
        })
        .collect();
    let mut m = Map::new();
    m.insert("reference".into(), image.describe().into());
    if let Some(d) = image.top_digest() {
        m.insert("digest".into(), d.into());
    }
    if !image.platforms().is_empty() {
        m.insert("platforms".into(), image.platforms().into());
    }
    if let Some(t) = image.artifact_type() {
        m.insert("artifact-type".into(), t.into());
    }
    m.insert("layers".into(), layers.into());
    m.insert("env".into(), image.env().into());
    m.insert("config-labels".into(), json!(image.config_labels()));
    Value::Object(m)
}

fn report(
    shown: &str,
    found: &Inspected,
    progress: &Progress,
    msg: &TerminationMessage,
    image: Option<Value>,
) -> Value {
    let r = found
        .report
        .lock()
        .ok()
        .and_then(|r| r.clone())
        .unwrap_or_default();
    let s = progress.snapshot();
    let mut out = Map::new();
    out.insert("source".into(), shown.into());
    out.insert(
        "layers".into(),
        r.layers.iter().map(|f| f.name()).collect::<Vec<_>>().into(),
    );
    if let Some(e) = &r.tar_entry {
        out.insert("tar-entry".into(), e.as_str().into());
    }
    out.insert(
        "format".into(),
        r.format.map_or(Value::Null, |f| f.name().into()),
    );
    out.insert("virtual-size".into(), r.virtual_size.into());
    out.insert("image-size".into(), s.decoded.into());
    out.insert("source-size".into(), s.source.into());
    if found.hashed.load(Ordering::Relaxed) {
        out.insert("sha256".into(), tap_digest(&found.source_sha256).into());
    }
    out.insert(
        "pvc-labels".into(),
        json!(msg.labels.clone().unwrap_or_default()),
    );
    if let Some(i) = image {
        out.insert("image".into(), i);
    }
    Value::Object(out)
}

/// `key  value` lines; nested objects flattened with dots, lists joined by commas.
fn to_table(v: &Value) -> String {
    fn walk(prefix: &str, v: &Value, rows: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, rows);
                }
            }
            Value::Array(a) if a.iter().any(|x| x.is_object()) => {
                for (i, x) in a.iter().enumerate() {
                    walk(&format!("{prefix}[{i}]"), x, rows);
                }
            }
            Value::Array(a) => rows.push((
                prefix.to_string(),
                a.iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
            Value::String(s) => rows.push((prefix.to_string(), s.clone())),
            other => rows.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut rows = Vec::new();
    walk("", v, &mut rows);
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:width$}  {v}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_classified_like_an_import_would_take_them() {
        assert_eq!(classify("docker://r/x:1").0, SourceKind::Registry);
        assert_eq!(classify("oci:/d:t").0, SourceKind::Registry);
        assert_eq!(classify("oci-archive:/a.tar").0, SourceKind::Registry);
        assert_eq!(classify("https://h/disk.qcow2").0, SourceKind::Http);
        let (s, e) = classify("/tmp/disk.img");
        assert_eq!((s, e.as_str()), (SourceKind::Http, "file:///tmp/disk.img"));
    }

    #[test]
    fn table_flattens_objects_and_lists() {
        let v =
            json!({"format": "qcow2", "layers": ["xz", "tar"], "image": {"layers": [{"size": 3}]}});
        let t = to_table(&v);
        assert!(t.contains("format"), "{t}");
        assert!(t.contains("xz, tar"), "{t}");
        assert!(t.contains("image.layers[0].size  3"), "{t}");
    }
}
