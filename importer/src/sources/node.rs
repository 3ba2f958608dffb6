//! Node pull (`pullMethod: node`, docs/cdi-contract.md section 3): the containerDisk runs as a
//! container on the node and serves its disk on loopback; the importer waits for its
//! ready file and reads the image environment for labels.

use crate::config::import::NodePull;
use crate::failure::Failure;
use std::collections::BTreeMap;
use std::time::Duration;

/// Node pull: the server inside the containerDisk container serves its environment (the
/// image's ENV) at `/info`; its KUBEVIRT_IO_ entries become labels, as with a registry.
pub async fn labels(client: &reqwest::Client, endpoint: &str) -> Option<BTreeMap<String, String>> {
    let mut url = reqwest::Url::parse(endpoint).ok()?;
    url.set_path("/info");
    let idle = Duration::from_secs(30);
    let info: serde_json::Value = match client.get(url).timeout(idle).send().await {
        Ok(r) => {
            let bound = crate::net::body::Bound::AtMost(crate::net::body::TOKEN_MAX);
            let body = crate::net::body::read(r, bound, idle, "the disk server's /info")
                .await
                .map_err(|e| tracing::warn!(error = %e, "could not read the image environment"))
                .ok()?;
            serde_json::from_slice(&body).ok()?
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read the image environment from the disk server");
            return None;
        }
    };
    let env: Vec<String> = serde_json::from_value(info.get("env")?.clone()).ok()?;
    let labels = ferrydisk_common::cdi::labels::from_env(env.iter().map(String::as_str));
    (!labels.is_empty()).then_some(labels)
}

/// Node pull: wait for the ready file, whose content names the disk file served at the
/// endpoint's directory (docs/cdi-contract.md section 3). CDI waits 60 s; we wait `--ready-timeout`.
pub async fn endpoint(endpoint: &str, node: &NodePull) -> Result<String, Failure> {
    let Some(ready) = &node.ready_file else {
        return Ok(endpoint.to_string());
    };
    let start = std::time::Instant::now();
    let mut last_log = start;
    while !ready.exists() {
        if start.elapsed() >= node.ready_timeout {
            return Err(Failure::ReadyTimeout(ready.display().to_string()));
        }
        if last_log.elapsed() >= Duration::from_secs(30) {
            tracing::info!(file = %ready.display(), waited_s = start.elapsed().as_secs(), "waiting for ready file");
            last_log = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let name = std::fs::read_to_string(ready).unwrap_or_default();
    let name = name.trim();
    if name.is_empty() || name.contains('/') {
        return Ok(endpoint.to_string());
    }
    Ok(format!("{}{name}", endpoint.trim_end_matches("disk.img")))
}
