//! `importer clone-source` (also started as `cdi-cloner`): the source side of CDI's
//! host-assisted clone (`cmd/cdi-cloner/clone-source.go`). It reads the source volume
//! natively (a GNU sparse tar of a filesystem volume, `volume.rs`; the device itself for
//! a block volume), frames it with snappy, and POSTs it over mTLS to the target's upload
//! server with `x-cdi-content-type`, in bounded memory: a blocking thread produces, a
//! bounded channel carries 16 chunks, the HTTP body consumes. It exports
//! `kubevirt_cdi_clone_progress_total{ownerUID}` on :8443 and ends with CDI's
//! termination message (`Clone Complete`, plain text).

pub mod volume;

use crate::cli::ClonerArgs;
use crate::config::CloneConfig;
use bytes::Bytes;
use ferrydisk_common::progress::Progress;
use std::io::{self, Write};
use std::sync::Arc;

/// CDI's `klog.Fatalf`: exit 255 with the message.
fn fatal(msg: String) -> i32 {
    tracing::error!(error = %msg, "clone failed");
    eprintln!("{msg}");
    255
}

pub async fn run(args: ClonerArgs) -> i32 {
    tracing::info!(content_type = %args.content_type, mount = %args.mount.display(), upload_bytes = args.upload_bytes, "cloner starting");
    let cfg = match CloneConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => return fatal(e.to_string()),
    };
    let progress = Arc::new(Progress::default());
    progress.set_source_total(Some(cfg.upload_bytes).filter(|&n| n > 0));
    if let Some(addr) = cfg.metrics_addr {
        match crate::metrics::bind(addr).await {
            Ok((listener, acceptor)) => {
                tokio::spawn(crate::metrics::serve_named(
                    listener,
                    acceptor,
                    cfg.owner_uid.clone(),
                    progress.clone(),
                    (CLONE_METRIC, "The clone progress in percentage"),
                ));
            }
            Err(e) => tracing::warn!(%addr, error = %e, "progress metric not served"),
        }
    }
    let (producer, body) = produce(&cfg, progress.clone());
    tracing::info!(url = %cfg.upload_url, "posting the clone stream");
    let response = cfg
        .client
        .post(&cfg.upload_url)
        .header("x-cdi-content-type", &cfg.content_type)
        .body(body)
        .send()
        .await;
    let produced = producer.await;
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            return fatal(format!(
                "Error {} POSTing to {}",
                ferrydisk_common::error::chain_line(&e),
                cfg.upload_url
            ))
        }
    };
    let status = response.status();
    // The target's answer is a line of text; read bounded, as every remote body.
    let text = crate::net::body::error_text(response).await;
    // A refusal stops the body early: the target's answer is the error, not the pipe.
    if !status.is_success() {
        tracing::error!(status = status.as_u16(), response = %text, "the clone target refused the stream");
        return fatal(format!("Unexpected status code {}", status.as_u16()));
    }
    match produced {
        Ok(Ok(n)) => tracing::info!(bytes = n, "read the source volume"),
        Ok(Err(e)) => return fatal(format!("reading {}: {e}", cfg.mount.display())),
        Err(e) => return fatal(format!("the reader thread failed: {e}")),
    }
    tracing::info!(response = %text, "clone complete");
    progress.complete();
    let mut message = String::from("Clone Complete");
    if cfg.preallocation {
        message.push_str(", Preallocation applied");
    }
    match ferrydisk_common::cdi::termination::write_failure(&cfg.termination_log, &message) {
        Ok(_) => 0,
        Err(e) => {
            tracing::error!(error = %e, "could not write the termination message");
            1
        }
    }
}

/// The volume read on a blocking thread (the device, or a sparse tar of the
/// filesystem), snappy-framed into a bounded channel that the request body drains.
fn produce(
    cfg: &CloneConfig,
    progress: Arc<Progress>,
) -> (tokio::task::JoinHandle<io::Result<u64>>, reqwest::Body) {
    let (tx, rx) =
        tokio::sync::mpsc::channel::<io::Result<Bytes>>(ferrydisk_common::stream::CHANNEL_CHUNKS);
    let (mount, block, sparse) = (cfg.mount.clone(), cfg.block, !cfg.preallocation);
    let producer = tokio::task::spawn_blocking(move || {
        let mut out = snap::write::FrameEncoder::new(ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        });
        let counted = CountingWriter {
            inner: &mut out,
            progress: &progress,
        };
        let result = if block {
            std::fs::File::open(&mount).and_then(|mut dev| {
                let mut counted = counted;
                io::copy(&mut dev, &mut counted)
            })
        } else {
            volume::write_tar(&mount, sparse, counted)
        };
        let result = result.and_then(|n| {
            out.flush()?;
            let mut inner = out.into_inner().map_err(|e| e.into_error())?;
            inner.flush()?;
            Ok(n)
        });
        if let Err(e) = &result {
            // The body then ends with an error: the target sees a failed stream.
            let _ = tx.blocking_send(Err(io::Error::new(e.kind(), e.to_string())));
        }
        result
    });
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|item| (item, rx))
    }));
    (producer, body)
}

/// CDI's clone progress metric (`pkg/monitoring/metrics/cdi-cloner`).
pub const CLONE_METRIC: &str = "kubevirt_cdi_clone_progress_total";

/// Chunks handed to the HTTP body.
const CHUNK: usize = 256 << 10;

/// Counts source bytes for the progress metric (CDI counts what it reads from tar or
/// the device, before compression).
struct CountingWriter<'a, W: Write> {
    inner: W,
    progress: &'a Progress,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.add_source(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A blocking `Write` into the bounded channel the HTTP body reads: back-pressure from
/// the network reaches the volume reader.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

/// `cloner_startup.sh`, the cloner image's entrypoint in CDI: `VOLUME_MODE` and
/// `MOUNT_POINT` from the pod spec, the byte count for the progress metric (the
/// device's size; for a filesystem `du -sb` with preallocation, else the allocated
/// bytes), then the cloner with CDI's flags.
pub async fn startup(args: crate::cli::StartupArgs) -> i32 {
    let (mode, mount) = (args.volume_mode, args.mount_point);
    if mode.is_empty() {
        eprintln!("VOLUME_MODE missing");
        return 1;
    }
    if mount.is_empty() {
        eprintln!("MOUNT_POINT missing");
        return 1;
    }
    println!("VOLUME_MODE={mode}");
    println!("MOUNT_POINT={mount}");
    let mount = std::path::PathBuf::from(mount);
    let (content_type, bytes) = if mode == "block" {
        let size = std::fs::File::open(&mount)
            .and_then(|mut f| io::Seek::seek(&mut f, io::SeekFrom::End(0)));
        match size {
            Ok(n) => ("blockdevice-clone", n),
            Err(e) => return fatal(format!("sizing {}: {e}", mount.display())),
        }
    } else {
        let apparent = args.env.preallocation.as_deref() == Some("true");
        ("filesystem-clone", volume::du(&mount, apparent))
    };
    println!("UPLOAD_BYTES={bytes}");
    run(ClonerArgs {
        verbosity: 3,
        content_type: content_type.into(),
        mount,
        upload_bytes: bytes,
        termination_log: "/dev/termination-log".into(),
        metrics_addr: "0.0.0.0:8443".into(),
        env: args.env,
        timeouts: args.timeouts,
    })
    .await
}
