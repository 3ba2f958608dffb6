//! One resumable upload: a pipeline that lives across requests. Each PATCH's body goes
//! into the same running pipeline, so a dropped connection costs nothing while the
//! server lives (the offset is every byte the pipeline took, whatever the format); a
//! raw image on a filesystem volume is also checkpointed to a state file, so a
//! restarted server takes it back from its last fsynced byte.

use super::state::{self, Saved};
use crate::disk::{self, DiskPlan};
use crate::failure::Failure;
use crate::upload::outcome::{finish, join};
use crate::upload::{Busy, Phase, Server};
use bytes::Bytes;
use ferrydisk_common::cdi::termination::TerminationMessage;
use ferrydisk_common::checksum::{Checksum, ChecksumError, Digests};
use ferrydisk_common::error::SourceError;
use ferrydisk_common::progress::Progress;
use ferrydisk_common::sniff::{sniff, Format};
use ferrydisk_common::stream::ChunkSender;
use ferrydisk_common::ErrorKind;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::task::JoinHandle;

use ferrydisk_common::tus::HEAD_LEN;
/// Source bytes between two syncs of a raw image's disk: the saved offset trails the
/// bytes taken by about this plus what the pipeline holds (a few MiB).
const SYNC_EVERY: u64 = 32 << 20;

pub struct Session {
    pub id: String,
    pub length: u64,
    /// Bytes the pipeline took: what HEAD answers.
    offset: AtomicU64,
    /// Bumped by every PATCH; one still reading when it changes stops (its client went
    /// away and came back on another connection, which the server may not have noticed).
    turn: tokio::sync::watch::Sender<u64>,
    inner: tokio::sync::Mutex<Inner>,
    pub progress: Arc<Progress>,
    /// Whole-image digests given at creation.
    wants: Vec<Checksum>,
    /// `sha256:<hex>` of the first [`HEAD_LEN`] bytes, once they came.
    head: OnceLock<String>,
    /// The state file, for a disk that can be taken back after a restart.
    state_path: Option<PathBuf>,
    /// The disk file, and where this pipeline began writing it (0, or a restored offset):
    /// a raw image's disk holds its first `base + written` bytes.
    disk_path: PathBuf,
    base: u64,
}

struct Inner {
    feed: Option<Feed>,
    digests: Digests,
    /// The first bytes, until [`HEAD_LEN`] (or the whole image) came.
    head_buf: Vec<u8>,
    saved: Saved,
    /// A sync of the disk in flight: what it makes durable.
    sync: Option<JoinHandle<std::io::Result<u64>>>,
    /// The offset at which the last sync began.
    sync_from: u64,
}

/// The running pipeline and what ends with it.
struct Feed {
    tx: ChunkSender,
    work: JoinHandle<Result<TerminationMessage, Failure>>,
    busy: Busy,
    reporter: JoinHandle<()>,
}

/// Why a session could not be created.
#[derive(Debug)]
pub enum StartRefused {
    /// The server finished its upload (CDI: 409).
    Done,
    /// Another upload is running (CDI: 503).
    Busy,
}

/// What one PATCH did.
pub enum Patched {
    /// The body was taken; the upload goes on from this offset.
    Taken(u64),
    /// The last byte is converted and durable.
    Complete,
    /// The request's offset is not the upload's.
    Conflict { at: u64 },
    /// A newer request took the upload over.
    Superseded,
    /// The body would go past `Upload-Length` (nothing past it was taken).
    PastLength { at: u64 },
    /// A checksummed body larger than is held for its check.
    ChecksumBodyTooLarge,
    /// `Upload-Checksum` did not match: nothing was taken.
    ChecksumMismatch,
    /// The upload ended (completed, failed or terminated) while this request waited.
    Ended,
    /// The body broke off or stalled; what came before was taken.
    ClientFailed { at: u64, why: String },
    /// The upload failed (the pipeline refused the data, or the whole-image digest did
    /// not match): the disk is empty and the session gone.
    Failed(Failure),
}

/// A request's body, read frame by frame with the idle timeout.
pub type Body = hyper::body::Incoming;

/// A PATCH with `Upload-Checksum` is held until its digest is checked: at most this.
pub const MAX_CHECKSUMMED: u64 = 64 << 20;

impl Session {
    /// A new upload: the server taken, the pipeline started and waiting for bytes.
    /// `digests` hash for `wants` and for `algorithms`, whose digests the last PATCH
    /// brings.
    pub fn start(
        server: &Arc<Server>,
        id: String,
        length: u64,
        wants: Vec<Checksum>,
        algorithms: Vec<String>,
        digests: Digests,
    ) -> Result<Arc<Session>, StartRefused> {
        let busy = server.try_start().map_err(|p| match p {
            Phase::Done => StartRefused::Done,
            _ => StartRefused::Busy,
        })?;
        let plan = server.disk_plan(false);
        let state_path = persisted(&plan);
        let saved = Saved::new(
            &id,
            length,
            wants.iter().map(|c| c.to_string()).collect(),
            algorithms,
        );
        if let Some(p) = &state_path {
            save(p, &saved);
        }
        let progress = Arc::new(Progress::default());
        let disk_path = plan.dest.path().to_path_buf();
        let feed = spawn(server, plan, busy, progress.clone(), length, None);
        tracing::info!(%id, length, "resumable upload created");
        Ok(Self::new(
            id, length, 0, wants, digests, progress, feed, saved, state_path, disk_path,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        id: String,
        length: u64,
        offset: u64,
        wants: Vec<Checksum>,
        digests: Digests,
        progress: Arc<Progress>,
        feed: Feed,
        saved: Saved,
        state_path: Option<PathBuf>,
        disk_path: PathBuf,
    ) -> Arc<Session> {
        let head = OnceLock::new();
        if let Some(h) = &saved.head {
            let _ = head.set(h.clone());
        }
        Arc::new(Session {
            id,
            length,
            offset: AtomicU64::new(offset),
            turn: tokio::sync::watch::channel(0).0,
            inner: tokio::sync::Mutex::new(Inner {
                feed: Some(feed),
                digests,
                head_buf: Vec::new(),
                saved,
                sync: None,
                sync_from: offset,
            }),
            progress,
            wants,
            head,
            state_path,
            disk_path,
            base: offset,
        })
    }

    /// A raw upload taken back after a restart, from its state file: the disk's
    /// first `saved.offset` bytes are checked against the state (their head digest) and
    /// hashed again for the whole-image digests; the stream continues there.
    pub async fn restore(server: &Arc<Server>, saved: Saved) -> Result<Arc<Session>, String> {
        let plan = server.disk_plan(false);
        let state_path = persisted(&plan).ok_or("the volume keeps no upload state")?;
        let disk_path = plan.dest.path().to_path_buf();
        let disk = disk_path.clone();
        let wants = saved
            .checksums
            .iter()
            .map(|c| Checksum::parse(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let mut digests = hashers(&wants, &saved.algorithms).map_err(|e| e.to_string())?;
        let (offset, head) = (saved.offset, saved.head.clone());
        let digests = tokio::task::spawn_blocking(move || {
            rehash(&disk, offset, head.as_deref(), &mut digests).map(|()| digests)
        })
        .await
        .map_err(|e| e.to_string())??;
        let busy = server
            .try_start()
            .map_err(|_| "the server is not idle".to_string())?;
        let progress = Arc::new(Progress::default());
        progress.add_source(saved.offset);
        let feed = spawn(
            server,
            plan,
            busy,
            progress.clone(),
            saved.length,
            Some(saved.offset),
        );
        tracing::info!(id = %saved.id, offset = saved.offset, length = saved.length, "resumable upload taken back after a restart");
        Ok(Self::new(
            saved.id.clone(),
            saved.length,
            saved.offset,
            wants,
            digests,
            progress,
            feed,
            saved,
            Some(state_path),
            disk_path,
        ))
    }

    pub fn offset(&self) -> u64 {
        self.offset.load(Ordering::Acquire)
    }

    pub fn head(&self) -> Option<&str> {
        self.head.get().map(String::as_str)
    }

    /// Stops whichever request holds the upload and takes it; `None` when a newer
    /// request came meanwhile.
    async fn take_turn(&self) -> Option<tokio::sync::MutexGuard<'_, Inner>> {
        let mut mine = 0;
        self.turn.send_modify(|t| {
            *t += 1;
            mine = *t;
        });
        let inner = self.inner.lock().await;
        (*self.turn.borrow() == mine).then_some(inner)
    }

    /// One PATCH: its body at `at`, checked against `checksum` when given; `digests`
    /// are whole-image digests the client sends with the last bytes.
    pub async fn patch(
        self: &Arc<Self>,
        server: &Arc<Server>,
        at: u64,
        checksum: Option<Checksum>,
        digests: Vec<Checksum>,
        body: Body,
    ) -> Patched {
        let Some(mut inner) = self.take_turn().await else {
            ferrydisk_common::serve::linger::body(body);
            return Patched::Superseded;
        };
        let mut turn = self.turn.subscribe();
        if inner.feed.is_none() {
            ferrydisk_common::serve::linger::body(body);
            return Patched::Ended;
        }
        let now = self.offset();
        if at != now {
            ferrydisk_common::serve::linger::body(body);
            return Patched::Conflict { at: now };
        }
        let pumped = match checksum {
            Some(c) => self.pump_checked(&mut inner, body, c).await,
            None => self.pump(&mut inner, body, &mut turn).await,
        };
        match pumped {
            Pumped::Stopped => self.fail_after_pipeline(server, &mut inner).await,
            Pumped::Refused(p) => p,
            Pumped::Body(end) => {
                let at = self.offset();
                if at == self.length {
                    return self.complete(server, &mut inner, digests).await;
                }
                self.checkpoint_now(&mut inner).await;
                match end {
                    BodyEnd::Complete => Patched::Taken(at),
                    BodyEnd::PastLength => Patched::PastLength { at },
                    BodyEnd::Superseded => Patched::Superseded,
                    BodyEnd::Failed(why) => {
                        tracing::warn!(offset = at, error = %why, "the PATCH broke off; the upload waits to be resumed");
                        Patched::ClientFailed { at, why }
                    }
                }
            }
        }
    }

    /// Streams the body into the pipeline as it arrives.
    async fn pump(
        &self,
        inner: &mut Inner,
        mut body: Body,
        turn: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Pumped {
        use ferrydisk_common::serve::listen;
        let idle = listen::body_idle_timeout();
        loop {
            let frame = tokio::select! {
                biased;
                _ = turn.changed() => return Pumped::Body(BodyEnd::Superseded),
                f = listen::next_frame(&mut body, idle) => f,
            };
            let data = match frame {
                Ok(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
                Ok(None) => return Pumped::Body(BodyEnd::Complete),
                Ok(Some(Err(e))) => return Pumped::Body(BodyEnd::Failed(e.to_string())),
                Err(stalled) => return Pumped::Body(BodyEnd::Failed(stalled.to_string())),
            };
            let room = self.length - self.offset();
            let past = data.len() as u64 > room;
            let data = if past {
                data.slice(..room as usize)
            } else {
                data
            };
            if !data.is_empty() && self.take(inner, data).await.is_err() {
                ferrydisk_common::serve::linger::body(body);
                return Pumped::Stopped;
            }
            if past {
                ferrydisk_common::serve::linger::body(body);
                return Pumped::Body(BodyEnd::PastLength);
            }
        }
    }

    /// A checksummed body: held whole (up to [`MAX_CHECKSUMMED`]), checked, then taken.
    async fn pump_checked(&self, inner: &mut Inner, mut body: Body, want: Checksum) -> Pumped {
        use ferrydisk_common::serve::listen;
        let idle = listen::body_idle_timeout();
        let mut held: Vec<Bytes> = Vec::new();
        let mut n = 0u64;
        let mut digest = match Digests::new([want.algorithm()]) {
            Ok(d) => d,
            Err(_) => return Pumped::Refused(Patched::ChecksumMismatch),
        };
        loop {
            match listen::next_frame(&mut body, idle).await {
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        n += d.len() as u64;
                        if n > MAX_CHECKSUMMED || self.offset() + n > self.length {
                            ferrydisk_common::serve::linger::body(body);
                            return Pumped::Refused(if n > MAX_CHECKSUMMED {
                                Patched::ChecksumBodyTooLarge
                            } else {
                                Patched::PastLength { at: self.offset() }
                            });
                        }
                        digest.update(&d);
                        held.push(d);
                    }
                }
                Ok(None) => break,
                // A checksummed body that broke off is not taken at all.
                Ok(Some(Err(e))) => return Pumped::Body(BodyEnd::Failed(e.to_string())),
                Err(stalled) => return Pumped::Body(BodyEnd::Failed(stalled.to_string())),
            }
        }
        if digest.check(std::slice::from_ref(&want)).is_err() {
            tracing::warn!(
                bytes = n,
                "a PATCH's Upload-Checksum did not match; nothing taken"
            );
            return Pumped::Refused(Patched::ChecksumMismatch);
        }
        for d in held {
            if self.take(inner, d).await.is_err() {
                return Pumped::Stopped;
            }
        }
        Pumped::Body(BodyEnd::Complete)
    }

    /// Hands bytes to the pipeline: hashed, counted, the head noted, the state saved.
    async fn take(&self, inner: &mut Inner, data: Bytes) -> Result<(), ()> {
        let Some(feed) = &inner.feed else {
            return Err(());
        };
        inner.digests.update(&data);
        let n = data.len() as u64;
        let before = self.offset();
        let head_end = HEAD_LEN.min(self.length);
        if before < head_end {
            let k = (head_end - before).min(n) as usize;
            inner.head_buf.extend_from_slice(&data[..k]);
        }
        feed.tx.data(data).await.map_err(|_| ())?;
        self.offset.store(before + n, Ordering::Release);
        self.progress.add_source(n);
        if inner.saved.head.is_none() && inner.head_buf.len() as u64 == head_end {
            let head = ferrydisk_common::checksum::sha256_digest(&inner.head_buf);
            let format = sniff(&inner.head_buf);
            inner.head_buf = Vec::new();
            let _ = self.head.set(head.clone());
            inner.saved.head = Some(head);
            inner.saved.format = Some(format.to_string());
            if format != Format::Raw {
                tracing::info!(%format, "a {format} upload resumes while the server runs; after a restart it starts over");
            }
            self.save(inner);
        }
        if self.checkpointed(inner) {
            self.collect_sync(inner, false).await;
            if inner.sync.is_none() && self.offset() - inner.sync_from >= SYNC_EVERY {
                self.start_sync(inner);
            }
        }
        Ok(())
    }

    /// Whether this upload's progress is saved for a restart: a raw image whose state
    /// file is kept.
    fn checkpointed(&self, inner: &Inner) -> bool {
        self.state_path.is_some() && inner.saved.format.as_deref() == Some("raw")
    }

    /// Syncs the disk from another descriptor (fdatasync covers the file, whoever
    /// wrote it): every byte the writer had written before it began is then durable.
    fn start_sync(&self, inner: &mut Inner) {
        let written = self.base + self.progress.snapshot().written;
        let upto = written.min(self.offset());
        let path = self.disk_path.clone();
        inner.sync_from = self.offset();
        inner.sync = Some(tokio::task::spawn_blocking(move || {
            std::fs::File::open(&path)?.sync_data()?;
            Ok(upto)
        }));
    }

    /// A finished sync moves the saved offset (with `wait`, the one in flight first).
    async fn collect_sync(&self, inner: &mut Inner, wait: bool) {
        let done = inner.sync.as_ref().is_some_and(|t| t.is_finished());
        if !(done || wait) {
            return;
        }
        let Some(task) = inner.sync.take() else {
            return;
        };
        match task.await {
            Ok(Ok(upto)) if upto > inner.saved.offset => {
                inner.saved.offset = upto;
                self.save(inner);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "syncing the disk for the upload state"),
            Err(e) => tracing::warn!(error = %e, "syncing the disk for the upload state"),
        }
    }

    /// When a request ends with the upload unfinished: what it brought that the disk
    /// holds, made durable and saved.
    async fn checkpoint_now(&self, inner: &mut Inner) {
        if self.checkpointed(inner) {
            self.collect_sync(inner, true).await;
            self.start_sync(inner);
            self.collect_sync(inner, true).await;
        }
    }

    fn save(&self, inner: &Inner) {
        if let Some(p) = &self.state_path {
            save(p, &inner.saved);
        }
    }

    /// The last byte came: the whole-image digests checked, the pipeline ended, the
    /// disk finished (fsynced) before the answer.
    async fn complete(
        &self,
        server: &Arc<Server>,
        inner: &mut Inner,
        finals: Vec<Checksum>,
    ) -> Patched {
        let Some(feed) = inner.feed.take() else {
            return Patched::Ended;
        };
        let mut wants = self.wants.clone();
        wants.extend(finals);
        let digests =
            std::mem::replace(&mut inner.digests, Digests::new([]).expect("no algorithm"));
        let verdict = digests.check(&wants);
        let result = match verdict {
            Ok(()) => {
                if !wants.is_empty() {
                    tracing::info!(digests = wants.len(), "the whole image matches its digests");
                }
                feed.tx.end().await;
                join(feed.work).await
            }
            Err(e) => {
                let why = e.to_string();
                feed.tx
                    .fail(SourceError::new(ErrorKind::ChecksumMismatch, why.clone()))
                    .await;
                let _ = join(feed.work).await;
                Err(Failure::Process {
                    kind: ErrorKind::ChecksumMismatch,
                    message: why,
                })
            }
        };
        feed.reporter.abort();
        self.end();
        match result {
            Ok(msg) => {
                self.progress.complete();
                tracing::info!(id = %self.id, "resumable upload complete");
                finish(server, feed.busy, Ok(msg), false);
                server.resumable.retire(&self.id, "the upload is complete");
                Patched::Complete
            }
            Err(f) => {
                drop(feed.busy);
                server.resumable.retire(&self.id, &f.detail());
                tracing::error!(error = %f.detail(), "resumable upload failed");
                Patched::Failed(f)
            }
        }
    }

    /// The pipeline stopped taking bytes: its error ends the upload.
    async fn fail_after_pipeline(&self, server: &Arc<Server>, inner: &mut Inner) -> Patched {
        let Some(feed) = inner.feed.take() else {
            return Patched::Ended;
        };
        feed.reporter.abort();
        let f = match join(feed.work).await {
            Err(f) => f,
            Ok(_) => Failure::Config("the pipeline ended before the last byte".into()),
        };
        drop(feed.busy);
        self.end();
        server.resumable.retire(&self.id, &f.detail());
        tracing::error!(error = %f.detail(), "resumable upload failed");
        Patched::Failed(f)
    }

    /// Ends the upload at the client's word (DELETE) or for a new one: the pipeline
    /// stopped, the disk emptied, the server free.
    pub async fn terminate(&self, server: &Arc<Server>, why: &str) {
        let Some(mut inner) = self.take_turn().await else {
            return;
        };
        if let Some(feed) = inner.feed.take() {
            feed.reporter.abort();
            feed.tx
                .fail(SourceError::new(ErrorKind::Network, why.to_string()))
                .await;
            let _ = join(feed.work).await;
            drop(feed.busy);
        }
        self.end();
        server.resumable.retire(&self.id, why);
        tracing::info!(id = %self.id, reason = why, "resumable upload terminated");
    }

    /// Whether a request holds the upload now.
    pub fn in_use(&self) -> bool {
        self.inner.try_lock().is_err()
    }

    fn end(&self) {
        if let Some(p) = &self.state_path {
            state::remove(p);
        }
    }
}

enum Pumped {
    Body(BodyEnd),
    /// The pipeline stopped reading (it failed).
    Stopped,
    /// Answered without taking anything.
    Refused(Patched),
}

enum BodyEnd {
    Complete,
    PastLength,
    Superseded,
    Failed(String),
}

/// The state file of a plan whose disk can be taken back after a restart.
fn persisted(plan: &DiskPlan) -> Option<PathBuf> {
    disk::resumable_after_restart(plan).then(|| state::path_for(plan.dest.path()))
}

fn save(path: &std::path::Path, saved: &Saved) {
    if let Err(e) = state::save(path, saved) {
        tracing::warn!(path = %path.display(), error = %e, "could not save the upload state; a restarted server will not resume this upload");
    }
}

/// Starts the pipeline: a new image, or (`resume_at`) a raw one continued after a
/// restart.
fn spawn(
    server: &Arc<Server>,
    plan: DiskPlan,
    busy: Busy,
    progress: Arc<Progress>,
    length: u64,
    resume_at: Option<u64>,
) -> Feed {
    use tracing::Instrument;
    let (tx, mut reader) = ferrydisk_common::stream::channel();
    progress.set_source_total(Some(length));
    server.set_progress(progress.clone());
    let reporter = crate::report::spawn(progress.clone(), false);
    let work = tokio::spawn(
        disk::blocking(move || match resume_at {
            Some(at) => disk::write_raw_resumed(&plan, &mut reader, at, progress),
            None => disk::write_stream(&plan, reader, Some(length), progress, None, false),
        })
        .in_current_span(),
    );
    Feed {
        tx,
        work,
        busy,
        reporter,
    }
}

/// The hashers of an upload: for the digests it is checked against (`wants`) and for
/// the algorithms whose digests its last PATCH brings.
pub fn hashers(wants: &[Checksum], algorithms: &[String]) -> Result<Digests, ChecksumError> {
    Digests::new(
        wants
            .iter()
            .map(|c| c.algorithm())
            .chain(algorithms.iter().map(String::as_str)),
    )
}

/// Reads the disk's first `len` bytes into `digests`, checking its head against `head`.
fn rehash(
    disk: &std::path::Path,
    len: u64,
    head: Option<&str>,
    digests: &mut Digests,
) -> Result<(), String> {
    use std::io::Read;
    let f = std::fs::File::open(disk).map_err(|e| format!("opening {}: {e}", disk.display()))?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, f.take(len));
    let mut buf = vec![0u8; 1 << 20];
    let mut first = Vec::new();
    let mut done = 0u64;
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| format!("reading {}: {e}", disk.display()))?;
        if n == 0 {
            break;
        }
        if (first.len() as u64) < HEAD_LEN {
            let k = (HEAD_LEN as usize - first.len()).min(n);
            first.extend_from_slice(&buf[..k]);
        }
        digests.update(&buf[..n]);
        done += n as u64;
    }
    if done != len {
        return Err(format!(
            "{} holds {done} bytes, not the {len} its state says",
            disk.display()
        ));
    }
    if let Some(want) = head {
        if first.len() as u64 == HEAD_LEN
            && ferrydisk_common::checksum::sha256_digest(&first) != want
        {
            return Err(format!(
                "the first bytes of {} are not the upload's",
                disk.display()
            ));
        }
    }
    Ok(())
}
