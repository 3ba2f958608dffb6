//! Faults: the importer killed with SIGKILL at pseudo-random points of an import, then
//! run again, must leave exactly `qemu-img convert`'s bytes (10 trials, file and block
//! destinations); and one upload proxy carrying 800 uploads must not grow; a volume
//! that fills up mid-import (ENOSPC) is a terminal error naming it; an upload cut
//! between proxy and server fails and the next one is correct; slow links and a short
//! stall on the upload path complete, a long stall fails at the body idle timeout.

use ferrydisk_tests::token::{mint, Claims};
use ferrydisk_tests::upload::{
    curl, proxy, proxy_with, upload_server, upload_server_with, Mode, Pki,
};
use ferrydisk_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn kill_9_at_random_points_then_a_rerun_is_correct_10_of_10() {
    let d = tmp();
    let raw = dense_fixture_named(d.path(), "dense.raw", 9);
    let reference = qemu_reference(&raw, d.path());
    let want = std::fs::read(&reference).expect("ref");
    // 25 MiB at 16 MB/s: about 1.6 s per full import, room to die anywhere in it.
    let server = HttpServer::start(d.path(), &["--rate", "16000000"]);
    let url = server.url("dense.raw");
    let lo = Loop::new(&d.path().join("backing"), 32 << 20);
    let mut seed = 0x2545_f491_u64;
    let mut mid_import = 0;
    for trial in 0..10 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let delay = Duration::from_millis(50 + (seed >> 33) % 1400);
        let run = tmp();
        let block = trial % 2 == 1 && lo.is_some();
        let importer = |run: &Path| {
            let i = Importer::new(run).http(&url);
            match (&lo, block) {
                (Some(l), true) => i.block_device(&l.dev),
                _ => i,
            }
        };
        let mut child = importer(run.path()).spawn();
        std::thread::sleep(delay);
        if child.try_wait().expect("wait").is_none() {
            mid_import += 1;
        }
        let _ = Command::new("kill")
            .args(["-9", &child.id().to_string()])
            .status();
        let _ = child.wait();
        let o = importer(run.path()).run();
        o.assert_success();
        let got = match (&lo, block) {
            (Some(l), true) => std::fs::read(&l.dev).expect("device")[..want.len()].to_vec(),
            _ => std::fs::read(run.path().join("data/disk.img")).expect("disk"),
        };
        assert!(
            got == want,
            "trial {trial} (killed after {delay:?}, block {block}): bytes differ"
        );
    }
    assert!(
        mid_import >= 8,
        "only {mid_import} of 10 kills hit a running import"
    );
}

#[test]
fn eight_hundred_uploads_through_one_proxy_do_not_grow_it() {
    let d = tmp();
    let raw = d.path().join("disk.raw");
    raw_fixture(&raw, "4M", &[(0, 3 << 20, 0x5c)]);
    let pki = Pki::default();
    let run = tmp();
    let mut server = upload_server(&pki, run.path());
    let p = proxy(&pki, run.path(), server.port, Mode::Standalone, "client");
    let token = mint(&pki.key("api.key"), &Claims::upload("default", "disk"));
    let bearer = format!("Authorization: Bearer {token}");
    // A wrong digest: the whole body is streamed, written and refused (400), and the
    // upload server stays up for the next one; the data path runs every time.
    let url = format!(
        "https://127.0.0.1:{}/v1beta1/upload?checksum=sha256:{}",
        p.port,
        "0".repeat(64)
    );
    // RSS moves by ±10% from one upload to the next (allocator arenas, which thread took
    // the connection) with no trend: over 800 uploads the proxy ranged 10.5-12.5 MiB from
    // the 25th to the 800th (measured). Two medians of 11 readings still flaked in CI with
    // other tests running (10.6 -> 12.4 MiB). A leak is a trend, so the test fits one:
    // the least-squares slope of RSS over uploads 20..=n, which must stay under 4 KiB per
    // upload (a leak of 1.6 MiB over 400 uploads; five measured runs gave slopes from
    // -1.32 to +1.29 KiB per upload).
    //
    // Both binaries keep freed heap memory for reuse (`serve::process::keep_freed_memory`,
    // a CPU win), so RSS is the peak working set so far plus what fragmentation leaves,
    // which rises in steps that come further apart: measured over 1000 uploads (four
    // runs), the proxy 11.1-12.5 MiB at the 10th, 12.9-13.5 at the 100th, 13.4-14.0 at
    // the 400th, 13.6-14.1 at the 1000th; the upload server 17.2-20.3 at the 10th,
    // 18.7-20.8 at the 100th, 19.5-20.9 at the 400th, 19.8-21.5 at the 1000th. One step
    // of 1.3 MiB came between the 200th and 300th upload. That settling is not a trend,
    // so the slope is fitted over the second half of 800 uploads, where the steps are
    // rare: proxy 0.05-0.72 KiB per upload, upload server 1.2-3.0 (three runs). The
    // server, which in a cluster takes one upload and exits, may settle up to 8 KiB per
    // upload here (3.2 MiB over the 400: still far below any per-upload buffer leaking,
    // each upload moving 4 MiB through 1 MiB blocks); the proxy, which lives long, 4.
    let n: u32 = std::env::var("SOAK_UPLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(800)
        .max(100);
    let mut readings: Vec<(f64, u64, u64)> = Vec::new();
    let started = Instant::now();
    for i in 1..=n {
        let (code, body) = curl(
            &pki,
            &["-H", &bearer, "-T", raw.to_str().expect("utf8"), &url],
        );
        assert_eq!(code, 400, "upload {i}: {body}");
        if i > n / 2 {
            readings.push((
                f64::from(i),
                rss_kib(p.child.id()),
                rss_kib(server.child.id()),
            ));
        }
    }
    let slope = |pick: fn(&(f64, u64, u64)) -> u64| {
        let k = readings.len() as f64;
        let mx = readings.iter().map(|r| r.0).sum::<f64>() / k;
        let my = readings.iter().map(|r| pick(r) as f64).sum::<f64>() / k;
        let sxy: f64 = readings
            .iter()
            .map(|r| (r.0 - mx) * (pick(r) as f64 - my))
            .sum();
        let sxx: f64 = readings.iter().map(|r| (r.0 - mx).powi(2)).sum();
        (sxy / sxx, my)
    };
    let (proxy_slope, proxy_mean) = slope(|r| r.1);
    let (server_slope, server_mean) = slope(|r| r.2);
    eprintln!(
        "{n} uploads in {:.1} s; RSS over uploads {}..={n}: proxy mean {proxy_mean:.0} KiB, \
         slope {proxy_slope:+.2} KiB/upload; upload server mean {server_mean:.0} KiB, \
         slope {server_slope:+.2} KiB/upload",
        started.elapsed().as_secs_f64(),
        n / 2 + 1,
    );
    assert!(
        proxy_slope < 4.0,
        "proxy RSS grows {proxy_slope:.2} KiB per upload"
    );
    assert!(
        server_slope < 8.0,
        "upload server RSS grows {server_slope:.2} KiB per upload"
    );
    // And it still takes a good upload.
    let url = format!("https://127.0.0.1:{}/v1beta1/upload", p.port);
    let (code, body) = curl(
        &pki,
        &["-H", &bearer, "-T", raw.to_str().expect("utf8"), &url],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
    assert_same_bytes(&run.path().join("data/disk.img"), &raw);
}

/// Unmounts on drop.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn enospc_mid_import_is_a_terminal_error_naming_the_destination() {
    let d = tmp();
    let raw = dense_fixture_named(d.path(), "dense.raw", 11);
    let reference = qemu_reference(&raw, d.path());
    // 25 MiB at 8 MB/s: the filesystem fills while the import is writing.
    let server = HttpServer::start(d.path(), &["--rate", "8000000"]);
    let fs = d.path().join("fs.img");
    std::fs::File::create(&fs)
        .and_then(|f| f.set_len(48 << 20))
        .expect("fs image");
    sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&fs));
    let run = d.path().join("run");
    let data = run.join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&fs)
        .arg(&data)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIP: cannot loop-mount a filesystem here");
        return;
    }
    let _m = Mounted(data.clone());
    let child = Importer::new(&run).http(&server.url("dense.raw")).spawn();
    // Once the import is under way, something else takes the rest of the space (the
    // importer's own size check passed: the volume had room when it started).
    std::thread::sleep(Duration::from_millis(800));
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "status=none"])
        .arg(format!("of={}", data.join("filler").display()))
        .status();
    let out = child.wait_with_output().expect("wait");
    assert_ne!(
        out.status.code(),
        Some(0),
        "an import onto a full volume failed"
    );
    let term = std::fs::read_to_string(run.join("termination-log")).unwrap_or_default();
    assert!(
        term.contains("No space left on device") && term.contains("disk.img"),
        "the message names ENOSPC and the destination: {term}"
    );
    assert!(!term.contains("Import Complete"), "{term}");
    // With the space back, a rerun is correct.
    std::fs::remove_file(data.join("filler")).expect("rm filler");
    Importer::new(&run)
        .http(&server.url("dense.raw"))
        .run()
        .assert_success();
    assert_same_bytes(&data.join("disk.img"), &reference);
}

#[test]
fn an_upload_cut_between_proxy_and_server_fails_and_the_next_one_is_correct() {
    use ferrydisk_tests::objstore::DropProxy;
    let u = UploadFixture::new(5);
    let (pki, auth, file) = (&u.pki, u.auth.as_str(), u.file.as_str());
    let run = u.dir().join("run");
    let mut server = upload_server(pki, &run);
    // The first connection from the proxy to the server is cut 8 MiB into its bytes
    // (TLS records, mid-body); the next ones pass.
    let cut = DropProxy::start_upward(u.dir(), server.port, 8 << 20, 1);
    let p = proxy(pki, &run, cut.port, Mode::Standalone, "client");
    let url = format!("https://127.0.0.1:{}/v1beta1/upload", p.port);
    let (code, body) = curl(pki, &["-H", auth, "-T", file, &url]);
    assert_ne!(code, 200, "a cut upload is not a success: {body}");
    assert_eq!(
        server.wait(Duration::from_millis(500)),
        None,
        "the server waits for another upload"
    );
    let term = std::fs::read_to_string(run.join("termination-log")).unwrap_or_default();
    assert!(!term.contains("Upload Complete"), "{term}");
    // The same upload again, through the same proxy: complete and byte-equal. Until
    // the server has put the cut upload away it answers 503, which a client retries.
    let (code, body) = upload_until_taken(pki, auth, file, &url, &[]);
    assert_eq!(code, 200, "{body}\n{}", server.log());
    assert_eq!(
        server.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        server.log()
    );
    assert_same_bytes(&run.join("data/disk.img"), &u.reference);
}

/// A 25 MiB dense disk to upload, its `qemu-img convert` reference, the PKI and an
/// upload token's header.
struct UploadFixture {
    d: tempfile::TempDir,
    file: String,
    reference: std::path::PathBuf,
    pki: Pki,
    auth: String,
}

impl UploadFixture {
    fn new(seed: u64) -> Self {
        let d = tmp();
        let raw = dense_fixture_named(d.path(), "dense.raw", seed);
        let reference = qemu_reference(&raw, d.path());
        let pki = Pki::default();
        let token = mint(&pki.key("api.key"), &Claims::upload("default", "disk"));
        UploadFixture {
            file: raw.to_str().expect("utf8").to_string(),
            reference,
            auth: format!("Authorization: Bearer {token}"),
            pki,
            d,
        }
    }

    fn dir(&self) -> &Path {
        self.d.path()
    }
}

/// A body idle timeout short enough for a test; a slow but moving link stays under it.
const IDLE: (&str, &str) = ("FERRYDISK_BODY_IDLE_TIMEOUT", "2");

/// `curl -T file url` until it is not answered 503 (the server putting a
/// failed upload away); returns the last status and body.
fn upload_until_taken(
    pki: &Pki,
    auth: &str,
    file: &str,
    url: &str,
    extra: &[&str],
) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut args = vec!["-H", auth, "-T", file];
        args.extend_from_slice(extra);
        args.push(url);
        let (code, body) = curl(pki, &args);
        if code != 503 || Instant::now() > deadline {
            return (code, body);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A standalone proxy to `port` with the test's body idle timeout.
fn idle_proxy(pki: &Pki, run: &Path, port: u16) -> ferrydisk_tests::upload::Proc {
    proxy_with(pki, run, port, Mode::Standalone, "client", &[IDLE], &[])
}

#[test]
fn slow_links_and_a_short_stall_on_the_upload_path_complete_with_the_right_bytes() {
    use ferrydisk_tests::objstore::DropProxy;
    let u = UploadFixture::new(9);
    let (pki, auth, file) = (&u.pki, u.auth.as_str(), u.file.as_str());
    // 1. A slow client (curl paced to 6 MB/s) and a slow link between proxy and server
    //    (paced to 8 MB/s): 25 MiB take about 4 s, longer than the 2 s idle timeout,
    //    which counts only silence.
    // 2. The link between proxy and server goes silent for 1 s, 8 MiB in, then carries
    //    on: shorter than the idle timeout, so the upload completes.
    for (i, case) in ["slow", "short stall"].iter().enumerate() {
        let run = u.dir().join(format!("run{i}"));
        let mut server = upload_server_with(pki, &run, &[IDLE]);
        // Each link proxy in a directory of its own, so its cut file is its own.
        let link = match *case {
            "slow" => DropProxy::slow_upward(&run, server.port, 8_000_000),
            _ => DropProxy::stall_upward(&run, server.port, 8 << 20, 1, 1.0),
        };
        let p = idle_proxy(pki, &run, link.port);
        let url = format!("https://127.0.0.1:{}/v1beta1/upload", p.port);
        let started = Instant::now();
        let extra: &[&str] = if *case == "slow" {
            &["--limit-rate", "6M"]
        } else {
            &[]
        };
        let (code, body) = upload_until_taken(pki, auth, file, &url, extra);
        let took = started.elapsed();
        assert_eq!(code, 200, "{case}: {body}\n{}\n{}", p.log(), server.log());
        if *case == "slow" {
            assert!(
                took > Duration::from_secs(3),
                "{case}: the link was not slow ({took:?})"
            );
        } else {
            link.wait_cut(Duration::from_secs(1));
        }
        assert_eq!(
            server.wait(Duration::from_secs(20)),
            Some(0),
            "{case}: {}",
            server.log()
        );
        assert_same_bytes(&run.join("data/disk.img"), &u.reference);
    }
}

#[test]
fn a_stalled_upload_fails_at_the_idle_timeout_and_the_next_one_is_correct() {
    use ferrydisk_tests::objstore::DropProxy;
    let u = UploadFixture::new(11);
    let (pki, auth, file) = (&u.pki, u.auth.as_str(), u.file.as_str());
    // The first connection goes silent 8 MiB into the body for 60 s (a client or link
    // gone without a FIN): 1. between proxy and server, so the server's idle timeout
    // fires; 2. between client and proxy, so the proxy's fires and fails the upstream
    // body. Either way the stalled upload fails in seconds, not 60 s or never (CDI has
    // no body timeout), the server takes the next upload, and that one is correct.
    for (i, case) in ["proxy to server", "client to proxy"].iter().enumerate() {
        let run = u.dir().join(format!("run{i}"));
        let mut server = upload_server_with(pki, &run, &[IDLE]);
        let (link, p, url_port) = if i == 0 {
            let link = DropProxy::stall_upward(&run, server.port, 8 << 20, 1, 60.0);
            let p = idle_proxy(pki, &run, link.port);
            let port = p.port;
            (link, p, port)
        } else {
            let p = idle_proxy(pki, &run, server.port);
            let link = DropProxy::stall_upward(&run, p.port, 8 << 20, 1, 60.0);
            let port = link.port;
            (link, p, port)
        };
        let stalled_url = format!("https://127.0.0.1:{url_port}/v1beta1/upload");
        let started = Instant::now();
        let (code, body) = curl(
            pki,
            &["-H", auth, "-T", file, "--max-time", "40", &stalled_url],
        );
        let took = started.elapsed();
        link.wait_cut(Duration::from_secs(1));
        assert_ne!(
            code, 200,
            "{case}: a stalled upload is not a success: {body}"
        );
        assert!(
            took < Duration::from_secs(20),
            "{case}: the stall was waited out ({took:?})"
        );
        assert_eq!(
            server.wait(Duration::from_millis(500)),
            None,
            "{case}: the server waits for another upload"
        );
        let log = format!("{}\n{}", p.log(), server.log());
        assert!(
            log.contains("stalled"),
            "{case}: nothing says the upload stalled:\n{log}"
        );
        let term = std::fs::read_to_string(run.join("termination-log")).unwrap_or_default();
        assert!(!term.contains("Upload Complete"), "{term}");
        // The next upload, straight through the proxy.
        let url = format!("https://127.0.0.1:{}/v1beta1/upload", p.port);
        let (code, body) = upload_until_taken(pki, auth, file, &url, &[]);
        assert_eq!(code, 200, "{case}: {body}\n{}", server.log());
        assert_eq!(
            server.wait(Duration::from_secs(20)),
            Some(0),
            "{case}: {}",
            server.log()
        );
        assert_same_bytes(&run.join("data/disk.img"), &u.reference);
    }
}
