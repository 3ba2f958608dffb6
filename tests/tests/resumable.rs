//! Resumable uploads (tus 1.0) end to end: real clients (tuspy, `curl`) -> a link that
//! drops (tests/support/dropproxy.py) -> `uploadproxy` -> `importer upload-server`, the
//! disk compared byte for byte with `qemu-img convert`, the bytes sent counted at the
//! drop proxy.

use ferrydisk_tests::objstore::DropProxy;
use ferrydisk_tests::token::{mint, Claims};
use ferrydisk_tests::upload::{curl, proxy, upload_server_on, Mode, Pki, Proc};
use ferrydisk_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const CREATE: &str = "/v1beta1/upload-resumable";

/// A raw disk of `mib` MiB whose first `data_mib` MiB (after the first 64 KiB) are
/// random, so no format or compression makes it small: a cut lands mid-body.
fn random_disk(path: &Path, mib: u64, data_mib: u64, seed: u64) -> PathBuf {
    let mut x = seed | 1;
    let mut buf = vec![0u8; (data_mib * MIB) as usize];
    for b in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    let f = std::fs::File::create(path).expect("create");
    f.set_len(mib * MIB).expect("len");
    std::os::unix::fs::FileExt::write_all_at(&f, &buf, 64 << 10).expect("write");
    path.to_path_buf()
}

/// `raw` as each format a user uploads: itself, qcow2, a streamOptimized vmdk, gzip.
fn formats(dir: &Path, raw: &Path) -> Vec<PathBuf> {
    let conv = |name: &str, fmt: &str, opts: &[&str]| {
        let out = dir.join(name);
        sh(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", fmt])
            .args(opts)
            .arg(raw)
            .arg(&out));
        out
    };
    let gz = dir.join("disk.raw.gz");
    std::fs::write(
        &gz,
        sh(Command::new("gzip").args(["-1", "-c"]).arg(raw)).stdout,
    )
    .expect("gz");
    vec![
        raw.to_path_buf(),
        conv("disk.qcow2", "qcow2", &[]),
        conv("disk.vmdk", "vmdk", &["-o", "subformat=streamOptimized"]),
        gz,
    ]
}

/// The upload server, the proxy in front of it, and a link to the proxy that cuts the
/// client's first `drops` connections after `after` bytes each.
struct Stack {
    pki: Pki,
    run: tempfile::TempDir,
    server: Proc,
    proxy: Proc,
    link: DropProxy,
}

impl Stack {
    fn new(after: u64, drops: u32) -> Self {
        Self::with_env(after, drops, &[])
    }

    fn with_env(after: u64, drops: u32, env: &[(&str, &str)]) -> Self {
        let pki = Pki::default();
        let run = tmp();
        let server = upload_server_on(&pki, run.path(), &run.path().join("no-block"), env);
        let p = proxy(&pki, run.path(), server.port, Mode::Standalone, "client");
        let link = DropProxy::start_upward(run.path(), p.port, after, drops);
        Stack {
            pki,
            run,
            server,
            proxy: p,
            link,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}{CREATE}", self.link.port)
    }

    fn token(&self) -> String {
        mint(&self.pki.key("api.key"), &Claims::upload("default", "disk"))
    }

    fn disk(&self) -> PathBuf {
        self.run.path().join("data/disk.img")
    }

    /// tuspy uploads `file` (extra arguments to tests/support/tusupload.py).
    fn tuspy(&self, file: &Path, extra: &[&str]) -> (bool, String) {
        let out = Command::new("python3")
            .arg(root().join("tests/support/tusupload.py"))
            .args(["--url", &self.url(), "--token", &self.token(), "--file"])
            .arg(file)
            .args(extra)
            .env("REQUESTS_CA_BUNDLE", self.pki.path("ca.crt"))
            .output()
            .expect("python3");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// `curl` with the token and tus's version header; (status, headers + body).
    fn curl(&self, args: &[&str]) -> (u16, String) {
        let bearer = format!("Authorization: Bearer {}", self.token());
        let mut all = vec!["-D", "-", "-H", "Tus-Resumable: 1.0.0", "-H", &bearer];
        all.extend_from_slice(args);
        curl(&self.pki, &all)
    }

    /// `POST` for an upload of `len` bytes: its URL.
    fn create(&self, len: u64, metadata: Option<&str>) -> String {
        let length = format!("Upload-Length: {len}");
        let meta = metadata.map(|m| format!("Upload-Metadata: {m}"));
        let mut args = vec!["-X", "POST", "-H", &length];
        if let Some(m) = &meta {
            args.extend(["-H", m]);
        }
        let url = self.url();
        args.push(&url);
        let (code, text) = self.curl(&args);
        assert_eq!(code, 201, "{text}\n{}", self.server.log());
        let location = header(&text, "location").expect("Location");
        assert!(location.starts_with(&format!("{CREATE}/")), "{location}");
        format!("https://127.0.0.1:{}{location}", self.link.port)
    }

    fn offset(&self, upload: &str) -> u64 {
        let (code, text) = self.curl(&["-I", upload]);
        assert_eq!(code, 200, "{text}");
        header(&text, "upload-offset")
            .and_then(|v| v.parse().ok())
            .expect("Upload-Offset")
    }

    /// `PATCH` of `file`'s bytes from `from` at offset `at` (headers added by `extra`).
    fn patch(
        &self,
        upload: &str,
        file: &Path,
        from: u64,
        at: u64,
        extra: &[&str],
    ) -> (u16, String) {
        let part = self.run.path().join("part");
        let data = std::fs::read(file).expect("read");
        std::fs::write(&part, &data[from as usize..]).expect("part");
        let offset = format!("Upload-Offset: {at}");
        let body = format!("@{}", part.display());
        let mut args = vec![
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/offset+octet-stream",
            "-H",
            &offset,
            "--data-binary",
            &body,
        ];
        args.extend_from_slice(extra);
        args.push(upload);
        self.curl(&args)
    }

    /// PATCHes all of `file` from offset 0 (curl, in the background) through a link that
    /// goes silent for a minute after `after` bytes, nothing telling the server the body
    /// stopped; returns once the server has taken `reached` bytes (within `wait`, else
    /// `what` is the failure) and settled: the link (keep it), curl, and the offset then.
    fn patch_into_silence(
        &self,
        upload: &str,
        file: &Path,
        after: u64,
        reached: u64,
        wait: Duration,
        what: &str,
    ) -> (DropProxy, std::process::Child, u64) {
        let silent = DropProxy::stall_upward(self.run.path(), self.proxy.port, after, 1, 60.0);
        let stalled = upload.replace(
            &format!("127.0.0.1:{}", self.link.port),
            &format!("127.0.0.1:{}", silent.port),
        );
        let whole = self.run.path().join("whole");
        std::fs::copy(file, &whole).expect("copy");
        let bearer = format!("Authorization: Bearer {}", self.token());
        let curl = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "--cacert"])
            .arg(self.pki.path("ca.crt"))
            .args(["-X", "PATCH", "-H", "Tus-Resumable: 1.0.0", "-H", &bearer])
            .args(["-H", "Content-Type: application/offset+octet-stream"])
            .args(["-H", "Upload-Offset: 0", "--data-binary"])
            .arg(format!("@{}", whole.display()))
            .arg(&stalled)
            .spawn()
            .expect("curl");
        let deadline = std::time::Instant::now() + wait;
        while self.offset(upload) < reached {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
        let at = self.offset(upload);
        (silent, curl, at)
    }

    fn finished(&mut self) {
        assert_eq!(
            self.server.wait(Duration::from_secs(20)),
            Some(0),
            "the server exits after a complete upload: {}",
            self.server.log()
        );
        assert_eq!(
            cdi_part(
                &std::fs::read_to_string(self.run.path().join("termination-log")).expect("term")
            ),
            r#"{"preallocationApplied":false,"message":"Upload Complete"}"#
        );
        assert!(
            !self.run.path().join("data/disk.img.upload-state").exists(),
            "the state file is removed on completion"
        );
    }
}

fn header(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

#[test]
fn tuspy_resumes_every_format_after_three_cuts() {
    let d = tmp();
    let raw = random_disk(&d.path().join("disk.raw"), 40, 24, 7);
    let reference = qemu_reference(&raw, d.path());
    for file in formats(d.path(), &raw) {
        let len = std::fs::metadata(&file).expect("len").len();
        let mut s = Stack::new(6 * MIB, 3);
        let (ok, out) = s.tuspy(&file, &[]);
        assert!(ok, "{}: {out}\n{}", file.display(), s.server.log());
        s.finished();
        assert_same_bytes(&s.disk(), &reference);
        let (sent, cuts) = s.link.carried();
        assert_eq!(cuts, 3, "{}", file.display());
        let lag = sent.saturating_sub(len);
        eprintln!(
            "{}: {len} bytes, {sent} sent over the link, {cuts} cuts, {} bytes over the file per cut (TLS framing included)",
            file.display(),
            lag / u64::from(cuts)
        );
        assert!(
            sent <= len + u64::from(cuts) * 64 * MIB,
            "{}: {sent} bytes sent for {len}",
            file.display()
        );
    }
}

#[test]
fn curl_takes_the_offset_with_head_and_patches_the_rest() {
    let d = tmp();
    let raw = random_disk(&d.path().join("disk.raw"), 24, 12, 3);
    let reference = qemu_reference(&raw, d.path());
    for file in formats(d.path(), &raw) {
        let len = std::fs::metadata(&file).expect("len").len();
        // The link cuts the first two PATCHes after 4 MiB each.
        let mut s = Stack::new(4 * MIB, 2);
        let upload = s.create(len, None);
        let mut at = 0;
        for cut in 1..=2 {
            let (code, text) = s.patch(&upload, &file, at, at, &[]);
            assert_ne!(code, 204, "PATCH {cut} was cut: {text}");
            let now = s.offset(&upload);
            assert!(
                now > at && now <= at + 4 * MIB,
                "offset after cut {cut}: {now}"
            );
            at = now;
        }
        // While the upload waits: the progress metric is between 0 and 100.
        let (code, metrics) = curl(
            &s.pki,
            &[&format!("https://127.0.0.1:{}/metrics", s.server.port)],
        );
        assert_eq!(code, 200);
        let percent: f64 = metrics
            .lines()
            .find(|l| l.starts_with("kubevirt_cdi_upload_progress_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .expect("the metric");
        assert!(percent > 0.0 && percent < 100.0, "{metrics}");
        // A PATCH at another offset is refused and takes nothing.
        let (code, text) = s.patch(&upload, &file, 0, 0, &[]);
        assert_eq!(code, 409, "{text}");
        assert_eq!(header(&text, "upload-offset"), Some(at.to_string()));
        assert_eq!(s.offset(&upload), at);
        let (code, text) = s.patch(&upload, &file, at, at, &[]);
        assert_eq!(code, 204, "{}: {text}\n{}", file.display(), s.server.log());
        assert_eq!(header(&text, "upload-offset"), Some(len.to_string()));
        s.finished();
        assert_same_bytes(&s.disk(), &reference);
        // The upload server has exited: the proxy says it is not there.
        let (code, _) = s.curl(&["-I", &upload]);
        assert_eq!(code, 503);
    }
}

#[test]
fn a_wrong_whole_image_digest_across_a_resume_empties_the_disk() {
    let d = tmp();
    let raw = random_disk(&d.path().join("disk.raw"), 16, 8, 5);
    let len = std::fs::metadata(&raw).expect("len").len();
    let s = Stack::new(3 * MIB, 1);
    let wrong = format!("sha256:{}", "0".repeat(64));
    let upload = s.create(len, Some(&tus_meta(&[("checksum", &wrong)])));
    let _ = s.patch(&upload, &raw, 0, 0, &[]);
    let at = s.offset(&upload);
    assert!(at > 0);
    let (code, text) = s.patch(&upload, &raw, at, at, &[]);
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("checksum mismatch"), "{text}");
    assert_eq!(
        std::fs::metadata(s.disk()).map(|m| m.len()).unwrap_or(0),
        0,
        "the disk is emptied"
    );
    let (code, text) = s.curl(&["-I", &upload]);
    assert_eq!(code, 410, "{text}");
    // The server takes a new upload: this time with the right digest.
    let right = sha256_file(&raw);
    let (ok, out) = s.tuspy(&raw, &["--checksum", &right]);
    assert!(ok, "{out}\n{}", s.server.log());
    assert_same_bytes(&s.disk(), &raw);
}

#[test]
fn upload_checksums_per_patch_are_honoured() {
    let d = tmp();
    let raw = random_disk(&d.path().join("disk.raw"), 12, 6, 9);
    let len = std::fs::metadata(&raw).expect("len").len();
    let s = Stack::new(u64::MAX >> 2, 0);
    let upload = s.create(len, None);
    // sha1 of "abc": not this body.
    let (code, text) = s.patch(
        &upload,
        &raw,
        0,
        0,
        &["-H", "Upload-Checksum: sha1 qZk+NkcGgWq6PiVxeFDCbJzQ2J0="],
    );
    assert_eq!(code, 460, "{text}");
    assert_eq!(s.offset(&upload), 0, "nothing was taken");
    let (code, text) = s.curl(&["-X", "DELETE", &upload]);
    assert_eq!(code, 204, "{text}");
    let (code, _) = s.curl(&["-I", &upload]);
    assert_eq!(code, 410);
    // tuspy sends a sha1 of every 4 MiB PATCH.
    let (ok, out) = s.tuspy(&raw, &["--chunk", "4194304", "--upload-checksum"]);
    assert!(ok, "{out}\n{}", s.server.log());
    assert_same_bytes(&s.disk(), &raw);
}

#[test]
fn a_killed_upload_server_resumes_from_its_saved_state() {
    let d = tmp();
    let raw = random_disk(&d.path().join("disk.raw"), 160, 150, 11);
    let len = std::fs::metadata(&raw).expect("len").len();
    let digest = sha256_file(&raw);
    let mut s = Stack::new(u64::MAX >> 2, 0);
    let upload = s.create(len, Some(&tus_meta(&[("checksum", &digest)])));
    // The link goes silent after 100 MiB of the PATCH: the server is killed while the
    // upload is in flight, with nothing telling it the body stopped.
    let (_stall, mut patch, cut) = s.patch_into_silence(
        &upload,
        &raw,
        100 * MIB,
        100 * MIB - 8 * MIB,
        Duration::from_secs(60),
        "the upload did not reach the stall",
    );
    // kill -9: nothing runs on the way out.
    let _ = s.server.child.kill();
    let _ = s.server.child.wait();
    let _ = patch.kill();
    let _ = patch.wait();
    let state = s.run.path().join("data/disk.img.upload-state");
    assert!(state.exists(), "the upload state is on the volume");
    // The same volume, a new server (and a proxy in front of it).
    let server = ferrydisk_tests::upload::upload_server(&s.pki, s.run.path());
    let p = proxy(
        &s.pki,
        s.run.path(),
        server.port,
        Mode::Standalone,
        "client",
    );
    let link = DropProxy::start_upward(s.run.path(), p.port, u64::MAX >> 2, 0);
    let upload = upload.replace(
        &format!("127.0.0.1:{}", s.link.port),
        &format!("127.0.0.1:{}", link.port),
    );
    s.server = server;
    s.proxy = p;
    s.link = link;
    let at = s.offset(&upload);
    eprintln!(
        "killed at {cut}, resumed at {at}: {:.1} MiB behind",
        (cut - at) as f64 / MIB as f64
    );
    assert!(at > 0 && at <= cut, "resumed at {at} of {cut}");
    assert!(
        cut - at <= 64 * MIB,
        "at most 64 MiB behind the cut: {at} of {cut}"
    );
    assert!(s.server.log().contains("taken back after a restart"));
    let (code, text) = s.patch(&upload, &raw, at, at, &[]);
    assert_eq!(code, 204, "{text}\n{}", s.server.log());
    s.finished();
    assert_same_bytes(&s.disk(), &raw);
}

#[test]
fn ferrydisk_upload_completes_over_a_link_that_drops_every_64_mib() {
    let d = tmp();
    let raw = random_disk(&d.path().join("disk.raw"), 1024, 1000, 13);
    let len = std::fs::metadata(&raw).expect("len").len();
    let mut s = Stack::new(64 * MIB, 15);
    let token_file = d.path().join("token");
    std::fs::write(&token_file, s.token()).expect("token");
    let base = format!("https://127.0.0.1:{}", s.link.port);
    let out = Command::new(bin("importer"))
        .arg("upload")
        .arg(&raw)
        .args(["--url", &base, "--token-file"])
        .arg(&token_file)
        .arg("--cacert")
        .arg(s.pki.path("ca.crt"))
        .output()
        .expect("upload");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}\n{}", s.server.log());
    s.finished();
    let (sent, cuts) = s.link.carried();
    eprintln!(
        "{len} bytes, {sent} sent over the link, {cuts} cuts, {} bytes over the file per cut (TLS framing included)",
        sent.saturating_sub(len) / u64::from(cuts.max(1))
    );
    assert_eq!(cuts, 15);
    assert!(log.contains("\"message\":\"upload complete\""), "{log}");
    assert!(log.contains("\"verified\":true"), "{log}");
    assert!(s
        .server
        .log()
        .contains("the whole image matches its digests"));
    assert_same_bytes(&s.disk(), &raw);
}

#[test]
fn a_restarted_server_on_a_block_volume_says_the_upload_starts_over() {
    let d = tmp();
    let Some(dev) = Loop::new(&d.path().join("backing"), 64 << 20) else {
        return;
    };
    let raw = random_disk(&d.path().join("disk.raw"), 32, 30, 17);
    let len = std::fs::metadata(&raw).expect("len").len();
    let pki = Pki::default();
    let run = tmp();
    let block = Path::new(&dev.dev);
    let server = upload_server_on(&pki, run.path(), block, &[]);
    let p = proxy(&pki, run.path(), server.port, Mode::Standalone, "client");
    let link = DropProxy::start_upward(run.path(), p.port, 8 * MIB, 1);
    let mut s = Stack {
        pki,
        run,
        server,
        proxy: p,
        link,
    };
    let upload = s.create(len, None);
    let _ = s.patch(&upload, &raw, 0, 0, &[]);
    assert!(s.offset(&upload) > 0);
    let _ = s.server.child.kill();
    let _ = s.server.child.wait();
    assert!(!s.run.path().join("data/disk.img.upload-state").exists());
    s.server = upload_server_on(&s.pki, s.run.path(), block, &[]);
    s.proxy = proxy(
        &s.pki,
        s.run.path(),
        s.server.port,
        Mode::Standalone,
        "client",
    );
    s.link = DropProxy::start_upward(s.run.path(), s.proxy.port, u64::MAX >> 2, 0);
    let upload = format!(
        "https://127.0.0.1:{}{}",
        s.link.port,
        &upload[upload.find(CREATE).expect("path")..]
    );
    let (code, text) = s.curl(&["-I", &upload]);
    assert_eq!(code, 404, "{text}");
    let (code, text) = s.curl(&[
        "-X",
        "PATCH",
        "-H",
        "Content-Type: application/offset+octet-stream",
        "-H",
        "Upload-Offset: 0",
        "--data-binary",
        "x",
        &upload,
    ]);
    assert_eq!(code, 404);
    assert!(
        text.contains("resumes only a raw image on a filesystem volume")
            && text.contains("start the upload again"),
        "{text}"
    );
    // Started again, it completes.
    let (ok, out) = s.tuspy(&raw, &[]);
    assert!(ok, "{out}\n{}", s.server.log());
    s.finished();
    let on_device = std::fs::read(block).expect("read device");
    let want = std::fs::read(&raw).expect("read");
    assert!(
        on_device[..want.len()] == want[..],
        "the device holds the image"
    );
}

#[test]
fn a_deadline_ends_a_resumable_upload_nobody_sends_to() {
    let d = tmp();
    let raw = random_disk(&d.path().join("disk.raw"), 16, 8, 19);
    let len = std::fs::metadata(&raw).expect("len").len();
    let out =
        sh(Command::new("date").args(["-u", "-d", "+6 seconds", "+%Y-%m-%dT%H:%M:%SZ"])).stdout;
    let deadline = String::from_utf8_lossy(&out).trim().to_string();
    let mut s = Stack::with_env(2 * MIB, 1, &[("DEADLINE", &deadline)]);
    let upload = s.create(len, None);
    let _ = s.patch(&upload, &raw, 0, 0, &[]);
    assert!(s.offset(&upload) > 0);
    assert_eq!(
        s.server.wait(Duration::from_secs(30)),
        Some(0),
        "the server ends at its deadline: {}",
        s.server.log()
    );
    assert_eq!(
        cdi_part(&std::fs::read_to_string(s.run.path().join("termination-log")).expect("term")),
        r#"{"deadlinePassed":true,"message":"Deadline Passed"}"#
    );
    assert!(!s.run.path().join("data/disk.img.upload-state").exists());
    assert_eq!(
        std::fs::metadata(s.disk()).map(|m| m.len()).unwrap_or(0),
        0,
        "the half-sent disk is emptied"
    );
}

#[test]
fn a_client_back_on_a_new_connection_takes_over_a_silent_one() {
    let d = tmp();
    let raw = random_disk(&d.path().join("disk.raw"), 16, 12, 23);
    let len = std::fs::metadata(&raw).expect("len").len();
    let s = Stack::new(u64::MAX >> 2, 0);
    let upload = s.create(len, None);
    // A second link that goes silent after 4 MiB for a minute: the old connection the
    // server still waits on (its idle timeout is 300 s).
    let (_silent, mut old, at) = s.patch_into_silence(
        &upload,
        &raw,
        4 * MIB,
        2 * MIB,
        Duration::from_secs(30),
        "the first PATCH never got going",
    );
    let started = std::time::Instant::now();
    let (code, text) = s.patch(&upload, &raw, at, at, &[]);
    assert_eq!(code, 204, "{text}\n{}", s.server.log());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the new PATCH waited for the silent one: {:?}",
        started.elapsed()
    );
    let _ = old.kill();
    let _ = old.wait();
    assert_same_bytes(&s.disk(), &raw);
}

fn tus_meta(pairs: &[(&str, &str)]) -> String {
    use base64::Engine;
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{k} {}",
                base64::engine::general_purpose::STANDARD.encode(v)
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn sha256_file(p: &Path) -> String {
    let out = sh(Command::new("sha256sum").arg(p)).stdout;
    let text = String::from_utf8_lossy(&out);
    format!("sha256:{}", text.split_whitespace().next().expect("digest"))
}
