//! `IMPORTER_SOURCE=imageio`: a disk of oVirt, RHV or Oracle OLVM (what Forklift
//! migrates), as CDI's importer reads it (`pkg/importer/imageio-datasource.go`): log in
//! to the engine, find the disk (and the snapshot a stage names), create a download
//! transfer, wait for it to be `transferring`, read the image from the host's imageio
//! (or the engine's proxy), then finalize the transfer, or cancel it on any failure so
//! the engine does not keep the disk locked.
//!
//! * A whole disk, or the first stage of a warm migration, downloads as raw: with
//!   imageio's `extents` feature only the data extents are read (zero extents stay
//!   holes), else the whole image streams through the pipeline.
//! * A later stage (`IMPORTER_CURRENT_CHECKPOINT` and `..._PREVIOUS_CHECKPOINT`)
//!   downloads the snapshot as qcow2, whose backing file must be the previous
//!   checkpoint, and applies it onto the disk the previous stage wrote: only the
//!   clusters it allocates are written (`disk/delta.rs`), no scratch, no `qemu-img
//!   rebase`/`commit`.
//!
//! The transfer's ticket is extended every minute while data flows (CDI extends it when
//! a slow destination makes progress stall).

pub mod data;
pub mod engine;

use crate::config::import::ImportConfig;
use crate::disk::{blocking, write_delta, write_extents};
use crate::failure::Failure;
use engine::{Engine, EngineError, Target};
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

/// Connections reading data extents at once (imageio serves each from one thread and
/// allows 8 readers per ticket).
const READERS: usize = 2;

fn connect_err(kind: ErrorKind, message: String) -> Failure {
    Failure::Connect {
        source_name: "imageio".into(),
        kind,
        message,
    }
}

fn engine_err(e: EngineError) -> Failure {
    connect_err(e.kind(), e.to_string())
}

/// What this stage transfers: the target and its format.
async fn plan_transfer(
    engine: &Engine,
    plan: &ImportConfig,
) -> Result<(Target, &'static str), Failure> {
    let io = &plan.imageio;
    let disk = engine.disk(&io.disk_id).await.map_err(engine_err)?;
    tracing::info!(disk = %disk.id, total_size = disk.total_size, image = ?disk.image_id, "found the disk");
    let format = if io.is_delta() { "cow" } else { "raw" };
    let Some(current) = &io.current else {
        return Ok((Target::Disk(disk.id), format));
    };
    match engine.snapshot(&disk, current).await.map_err(engine_err)? {
        Some(s) => {
            tracing::info!(snapshot = %s.id, disk = %disk.id, actual_size = ?s.actual_size, "found the checkpoint's snapshot");
            Ok((Target::Snapshot(s.id), format))
        }
        // The active disk as the checkpoint (the last stage of a warm migration).
        None if disk.image_id.as_deref() == Some(current.as_str()) => {
            tracing::info!(checkpoint = %current, disk = %disk.id, "the checkpoint is the disk's active image");
            Ok((Target::Disk(disk.id), format))
        }
        None => Err(engine_err(EngineError::NoSnapshot {
            disk: disk.id,
            snapshot: current.clone(),
        })),
    }
}

pub async fn import(
    plan: ImportConfig,
    client: crate::sources::client::HttpClient,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let io = plan.imageio.clone();
    if io.disk_id.is_empty() {
        return Err(connect_err(
            ErrorKind::Config,
            "IMPORTER_DISK_ID is required for the imageio source".into(),
        ));
    }
    let (user, password) = plan.net.credentials.clone().ok_or_else(|| {
        connect_err(
            ErrorKind::Config,
            "the engine's user and password (IMPORTER_ACCESS_KEY_ID, IMPORTER_SECRET_KEY) are required".into(),
        )
    })?;
    let idle = plan.net.idle_timeout;
    let engine = Engine::login(
        client.reqwest.clone(),
        &plan.endpoint,
        &user,
        &password,
        idle,
    )
    .await
    .map_err(engine_err)?;
    let (target, format) = plan_transfer(&engine, &plan).await?;
    tracing::info!(disk = %io.disk_id, ?target, format, stage = if io.is_delta() { "delta" } else { "full" }, last_stage = io.last_stage, "creating the image transfer");
    let transfer = engine
        .start_transfer(&target, format, io.lock_wait)
        .await
        .map_err(engine_err)?;
    let result = read(&engine, &transfer, &plan, client, progress).await;
    // Finalized on success, cancelled on failure: the engine unlocks the disk either way.
    let action = if result.is_ok() { "finalize" } else { "cancel" };
    match engine.act(&transfer.id, action).await {
        Ok(()) => tracing::info!(transfer = %transfer.id, action, "image transfer closed"),
        Err(e) => {
            tracing::warn!(transfer = %transfer.id, action, error = %e, "could not close the image transfer; the engine ends it at its inactivity timeout")
        }
    }
    result
}

/// Waits for the transfer, then reads the image onto the disk while a task keeps the
/// ticket alive.
async fn read(
    engine: &Engine,
    transfer: &engine::Transfer,
    plan: &ImportConfig,
    client: crate::sources::client::HttpClient,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let io = &plan.imageio;
    let t = engine
        .wait_transferring(transfer, &io.disk_id, io.transfer_timeout)
        .await
        .map_err(engine_err)?;
    let url = t
        .url
        .clone()
        .ok_or_else(|| engine_err(EngineError::NoUrl(t.id.clone())))?;
    tracing::info!(transfer = %t.id, url = %crate::sources::redact::url(&url), "transferring");
    let keepalive = async {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if let Err(e) = engine.act(&t.id, "extend").await {
                tracing::warn!(error = %e, "could not extend the image transfer");
            }
        }
    };
    let copy = copy(plan, client, &url, progress);
    tokio::select! {
        r = copy => r,
        () = keepalive => Err(connect_err(ErrorKind::Io, "the transfer's keepalive stopped".into())),
    }
}

/// The image onto the disk: extents, a whole raw stream, or a delta.
async fn copy(
    plan: &ImportConfig,
    client: crate::sources::client::HttpClient,
    url: &str,
    progress: Arc<Progress>,
) -> Result<TerminationMessage, Failure> {
    let io = &plan.imageio;
    let idle = plan.net.idle_timeout;
    let retries = plan.net.retries;
    if let Some(previous) = io.previous.clone().filter(|_| io.is_delta()) {
        let opts = crate::sources::http::HttpOptions {
            what: Some("download of the snapshot".into()),
            ..crate::transfer::http_options(
                &plan.net,
                "imageio",
                crate::sources::http::Auth::None,
                progress.clone(),
            )?
        };
        let download = crate::sources::http::open(client, url, opts)
            .await
            .map_err(|e| connect_err(e.kind(), e.to_string()))?;
        let disk = plan.disk.for_volume();
        let reader = download.reader;
        return blocking(move || write_delta(&disk, reader, &previous, progress)).await;
    }
    if data::features(&client, url, idle)
        .await
        .iter()
        .any(|f| f == "extents")
    {
        let (size, extents) = data::extents(&client, url, idle)
            .await
            .map_err(|e| connect_err(ErrorKind::Network, e.to_string()))?;
        let data: u64 = extents.iter().filter(|e| !e.zero).map(|e| e.length).sum();
        tracing::info!(
            size,
            data_bytes = data,
            extents = extents.len(),
            "reading only the data extents"
        );
        let disk = plan.disk.for_volume();
        let (url, rt) = (url.to_string(), tokio::runtime::Handle::current());
        let open: Arc<crate::disk::OpenRange> = Arc::new(move |start: u64, length: u64| {
            Ok(Box::new(data::RangeReader::new(
                rt.clone(),
                client.reqwest.clone(),
                url.clone(),
                idle,
                start,
                length,
                retries,
            )) as Box<dyn std::io::Read>)
        });
        return blocking(move || write_extents(&disk, size, &extents, open, READERS, progress))
            .await;
    }
    let opts = crate::transfer::http_options(
        &plan.net,
        "imageio",
        crate::sources::http::Auth::None,
        progress,
    )?;
    crate::transfer::download(plan.disk.for_volume(), &client, url, opts, "imageio", 0).await
}
