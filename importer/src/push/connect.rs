//! The authenticated registry client for a push's destination.

use super::target::Dest;
use crate::config::push::Access;
use crate::net::registry::{self, Access as Scope, Connect, Registry};
use std::time::Duration;

/// Why the destination registry could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Client(#[from] crate::sources::client::ClientError),
    #[error("{host}: {}", ferrydisk_common::error::chain_line(.source))]
    Registry {
        host: String,
        source: registry::ApiError,
    },
}

/// The registry client for `dest`, authenticated for pull and push.
pub async fn connect(
    access: &Access,
    idle: Duration,
    dest: &Dest,
) -> Result<Registry, ConnectError> {
    let http = crate::sources::client::build(&crate::sources::client::ClientOptions {
        ca_dirs: access.cert_dir.iter().map(|p| p.as_path()).collect(),
        insecure: access.insecure,
        proxies: access.proxies.clone(),
        localhost_names: Vec::new(),
    })?;
    let (user, pass) = access.credentials.clone().unzip();
    let creds = crate::sources::registry::credentials(
        user.as_deref(),
        pass.as_deref(),
        access.auth_file.as_deref(),
        &dest.host,
    );
    Registry::connect(Connect {
        http,
        host: dest.host.clone(),
        repo: dest.repo.clone(),
        creds,
        insecure: access.insecure,
        access: Scope::PullPush,
        idle,
    })
    .await
    .map_err(|source| ConnectError::Registry {
        host: dest.host.clone(),
        source,
    })
}
