//! `importer source-update-poller` (also started as `cdi-source-update-poller`): CDI's
//! DataImportCron poller (`tools/cdi-source-update-poller`). The DataImportCron
//! controller runs it from the importer image on the cron's schedule; it reads the
//! digest of the image the cron follows and records the poll on the DataImportCron:
//! a JSON patch adding `lastCronTime`, and `sourceDesiredDigest` when the digest
//! changed, which makes the controller import the new image. The Kubernetes API is
//! reached with the `kube` client: in-cluster config, or `-kubeconfig` / `-server`.

use crate::cli::PollerArgs;
use crate::sources::registry::{self, RegistryOptions};
use std::time::Duration;

/// CDI's annotations (`pkg/controller/dataimportcron-controller.go`).
pub const ANN_LAST_CRON_TIME: &str = "cdi.kubevirt.io/storage.import.lastCronTime";
pub const ANN_SOURCE_DESIRED_DIGEST: &str = "cdi.kubevirt.io/storage.import.sourceDesiredDigest";

/// Go's `log.Fatalf`: the message, exit 1.
fn fatal(msg: String) -> i32 {
    tracing::error!(error = %msg, "poller failed");
    eprintln!("{msg}");
    1
}

/// `/metadata/annotations/<key>` with the key escaped as a JSON pointer (RFC 6901).
fn annotation_path(key: &str) -> String {
    format!(
        "/metadata/annotations/{}",
        key.replace('~', "~0").replace('/', "~1")
    )
}

/// The JSON patch CDI sends: `lastCronTime` always, the digest when it changed.
pub fn patch(now: &str, digest: &str, current: Option<&str>) -> serde_json::Value {
    let mut ops = vec![serde_json::json!({
        "op": "add", "path": annotation_path(ANN_LAST_CRON_TIME), "value": now
    })];
    if !digest.is_empty() && Some(digest) != current {
        ops.push(serde_json::json!({
            "op": "add", "path": annotation_path(ANN_SOURCE_DESIRED_DIGEST), "value": digest
        }));
    }
    serde_json::Value::Array(ops)
}

/// Why no client for the API server could be made.
#[derive(Debug, thiserror::Error)]
enum KubeConfigError {
    #[error(transparent)]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error(transparent)]
    InCluster(#[from] kube::config::InClusterError),
    #[error("--server {server:?}: {source}")]
    Server {
        server: String,
        source: http::uri::InvalidUri,
    },
    #[error(transparent)]
    Client(#[from] kube::Error),
}

async fn kube_client(args: &PollerArgs) -> Result<kube::Client, KubeConfigError> {
    let server = || {
        args.server
            .parse::<http::Uri>()
            .map_err(|source| KubeConfigError::Server {
                server: args.server.clone(),
                source,
            })
    };
    let mut config = match args
        .kubeconfig
        .as_deref()
        .filter(|p| !p.as_os_str().is_empty())
    {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None if !args.server.is_empty() => kube::Config::new(server()?),
        None => kube::Config::incluster()?,
    };
    if !args.server.is_empty() {
        config.cluster_url = server()?;
    }
    // CDI clears the proxy for the API server.
    config.proxy_url = None;
    config.read_timeout = Some(Duration::from_secs(30));
    Ok(kube::Client::try_from(config)?)
}

pub async fn run(args: PollerArgs) -> i32 {
    if args.url.is_empty() || args.ns.is_empty() || args.cron.is_empty() {
        return fatal("One or more mandatory parameters are missing".into());
    }
    let nonempty = |s: &Option<String>| s.clone().filter(|v| !v.is_empty());
    let opts = RegistryOptions {
        username: nonempty(&args.access_key_id),
        password: nonempty(&args.secret_key),
        auth_file: None,
        insecure: crate::cli::parse_go_bool(&args.insecure_tls).unwrap_or(false),
        ca_dirs: args.certdir.iter().cloned().collect(),
        arch: None,
        retries: 3,
        idle_timeout: Duration::from_secs(60),
        proxies: args.proxy.proxies(),
        registries_conf: args.registries_conf.clone(),
    };
    let digest = match registry::manifest_digest(&args.url, &opts).await {
        Ok(d) => d,
        Err(e) => return fatal(format!("Failed to get image digest: {e}")),
    };
    tracing::info!(%digest, "image digest");
    let client = match kube_client(&args).await {
        Ok(c) => c,
        Err(e) => return fatal(format!("Failed to build config: {e}")),
    };
    let path = format!(
        "/apis/cdi.kubevirt.io/v1beta1/namespaces/{}/dataimportcrons/{}",
        args.ns, args.cron
    );
    let get = http::Request::get(&path).body(Vec::new()).expect("request");
    let cron: serde_json::Value = match client.request(get).await {
        Ok(c) => c,
        Err(e) => {
            return fatal(format!(
                "Failed getting DataImportCron {}/{}: {e}",
                args.ns, args.cron
            ))
        }
    };
    let current = cron["metadata"]["annotations"][ANN_SOURCE_DESIRED_DIGEST].as_str();
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let ops = patch(&now, &digest, current);
    if ops.as_array().is_some_and(|a| a.len() > 1) {
        tracing::info!("Digest updated");
    } else {
        tracing::info!("No digest update");
    }
    let body = serde_json::to_vec(&ops).expect("json");
    let req = http::Request::patch(&path)
        .header(http::header::CONTENT_TYPE, "application/json-patch+json")
        .body(body)
        .expect("request");
    if let Err(e) = client.request_text(req).await {
        return fatal(format!(
            "Failed patching DataImportCron {}/{}: {e}",
            args.ns, args.cron
        ));
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_is_cdis() {
        let p = patch("2026-12-02T00:00:00Z", "sha256:ab", Some("sha256:ab"));
        assert_eq!(
            p.to_string(),
            r#"[{"op":"add","path":"/metadata/annotations/cdi.kubevirt.io~1storage.import.lastCronTime","value":"2026-12-02T00:00:00Z"}]"#
        );
        let p = patch("t", "sha256:cd", Some("sha256:ab"));
        assert_eq!(p.as_array().map(Vec::len), Some(2));
        assert_eq!(
            p[1]["path"],
            "/metadata/annotations/cdi.kubevirt.io~1storage.import.sourceDesiredDigest"
        );
    }
}
