//! The upload proxy and upload server under hostile clients (issue 11, section 4):
//! silent and half-open connections are closed by the handshake and header timeouts
//! while a real `curl -T` succeeds, running out of file descriptors does not make the
//! accept loop spin, and an upload larger than the volume always gets its 400.

use ferrydisk_tests::token::{mint, Claims};
use ferrydisk_tests::upload::{curl, proxy, proxy_with, upload_server_with, Mode, Pki};
use ferrydisk_tests::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bearer(pki: &Pki) -> String {
    format!(
        "Authorization: Bearer {}",
        mint(&pki.key("api.key"), &Claims::upload("default", "disk"))
    )
}

/// `curl -T file` through the proxy on `port` with a valid token.
fn upload(pki: &Pki, port: u16, file: &std::path::Path) -> (u16, String) {
    curl(
        pki,
        &[
            "-H",
            &bearer(pki),
            "-T",
            file.to_str().expect("utf8"),
            &format!("https://127.0.0.1:{port}/v1beta1/upload"),
        ],
    )
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// Whether the server has closed `c`: a read sees EOF or a reset within `within`.
fn closed_by_peer(c: &TcpStream, within: Duration) -> bool {
    let mut c = c;
    c.set_read_timeout(Some(within)).expect("timeout");
    let mut b = [0u8; 64];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // a TLS alert, then EOF
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

/// The first bytes of a TLS ClientHello, and nothing more.
const PARTIAL_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01];

/// `openssl s_client` that completes TLS, sends half a request's headers, then waits.
fn partial_headers(pki: &Pki, port: u16, client_cert: bool) -> std::process::Child {
    let mut c = Command::new("openssl");
    c.args(["s_client", "-quiet", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-CAfile")
        .arg(pki.path("ca.crt"));
    if client_cert {
        c.arg("-cert")
            .arg(pki.path("client.crt"))
            .arg("-key")
            .arg(pki.path("client.key"));
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl");
    let stdin = child.stdin.as_mut().expect("stdin");
    let _ = stdin.write_all(b"PUT /v1beta1/upload HTTP/1.1\r\nHost: x\r\nX-Slow: ");
    let _ = stdin.flush();
    child
}

#[test]
fn slowloris_clients_are_timed_out_while_a_real_upload_succeeds() {
    let d = tmp();
    let pki = Pki::default();
    let raw = d.path().join("disk.raw");
    raw_fixture(&raw, "16M", &[(1 << 20, 3 << 20, 0xab)]);
    let run = tmp();
    let timeouts = [
        ("FERRYDISK_HANDSHAKE_TIMEOUT", "3"),
        ("FERRYDISK_HEADER_TIMEOUT", "3"),
    ];
    let server = upload_server_with(&pki, run.path(), &timeouts);
    let p = proxy_with(
        &pki,
        run.path(),
        server.port,
        Mode::Standalone,
        "client",
        &timeouts,
        &[],
    );
    let started = Instant::now();
    let mut idle = Vec::new();
    for port in [p.port, server.port] {
        for i in 0..150 {
            let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            if i % 2 == 1 {
                c.write_all(PARTIAL_HELLO).expect("hello");
            }
            idle.push(c);
        }
    }
    let mut half = Vec::new();
    for _ in 0..10 {
        half.push(partial_headers(&pki, p.port, false));
        half.push(partial_headers(&pki, server.port, true));
    }
    let cpu_before = (cpu_seconds(p.child.id()), cpu_seconds(server.child.id()));
    // A real upload, while all of that is open.
    let (code, body) = upload(&pki, p.port, &raw);
    assert_eq!(code, 200, "{body}\n{}", server.log());
    assert_same_bytes(&run.path().join("data/disk.img"), &raw);
    // Every idle connection is closed by the timeouts (3 s, checked within 10 s).
    let open_after = idle
        .iter()
        .filter(|c| {
            let left = Duration::from_secs(10).saturating_sub(started.elapsed());
            !closed_by_peer(c, left.max(Duration::from_millis(100)))
        })
        .count();
    assert_eq!(
        open_after, 0,
        "idle connections still open after the timeouts"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    for mut h in half {
        loop {
            if h.try_wait().expect("wait").is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = h.kill();
                panic!("a half-sent request was not timed out");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let cpu_after = (cpu_seconds(p.child.id()), cpu_seconds(server.child.id()));
    let spent = (cpu_after.0 - cpu_before.0) + (cpu_after.1 - cpu_before.1);
    // The upload itself is 16 MiB through TLS twice: well under a second.
    assert!(
        spent < 3.0,
        "proxy and server used {spent:.2} CPU-s meanwhile"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn running_out_of_file_descriptors_does_not_spin_the_accept_loop() {
    let d = tmp();
    let pki = Pki::default();
    let raw = d.path().join("disk.raw");
    raw_fixture(&raw, "8M", &[(4096, 1 << 20, 0x5a)]);
    let run = tmp();
    let server = upload_server_with(&pki, run.path(), &[]);
    // 64 descriptors in all: the connections below exhaust them.
    let p = proxy_with(
        &pki,
        run.path(),
        server.port,
        Mode::Standalone,
        "client",
        &[("FERRYDISK_HANDSHAKE_TIMEOUT", "3")],
        &["/usr/bin/prlimit", "--nofile=64:64"],
    );
    let mut conns: Vec<TcpStream> = (0..120)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", p.port)).ok())
        .collect();
    let before = cpu_seconds(p.child.id());
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_seconds(p.child.id()) - before;
    assert!(
        spent < 0.5,
        "accept loop used {spent:.2} CPU-s in 2 s at EMFILE"
    );
    conns.clear();
    // Once the handshake timeouts free descriptors, uploads work again.
    std::thread::sleep(Duration::from_secs(4));
    let (code, body) = upload(&pki, p.port, &raw);
    assert_eq!(code, 200, "{body}\n{}", p.log());
    assert!(
        p.log().contains("accept failed; backing off"),
        "{}",
        p.log()
    );
}

/// An upload larger than UPLOAD_IMAGE_SIZE: every client sees CDI's 400 and its message,
/// through the proxy and straight from the upload server, never a reset or a 502.
#[test]
fn an_oversized_upload_always_gets_its_400() {
    let d = tmp();
    let pki = Pki::default();
    let big = d.path().join("big.raw");
    // Data everywhere, so the refusal comes early while curl is still sending.
    raw_fixture(&big, "64M", &[(0, 64 << 20, 0x77)]);
    let b = big.to_str().expect("utf8").to_string();
    let run = tmp();
    let server = upload_server_with(&pki, run.path(), &[("UPLOAD_IMAGE_SIZE", "8Mi")]);
    let p = proxy(&pki, run.path(), server.port, Mode::Standalone, "client");
    let via_proxy = format!("https://127.0.0.1:{}/v1beta1/upload", p.port);
    let direct = format!("https://127.0.0.1:{}/v1beta1/upload", server.port);
    let client_cert = pki.path("client.crt");
    let client_key = pki.path("client.key");
    for i in 0..5 {
        let (code, body) = curl(&pki, &["-H", &bearer(&pki), "-T", &b, &via_proxy]);
        assert_eq!(code, 400, "proxy, try {i}: {body}\n{}", p.log());
        assert!(
            body.contains("larger than the reported available storage"),
            "{body}"
        );
        let (code, body) = curl(
            &pki,
            &[
                "--cert",
                client_cert.to_str().expect("utf8"),
                "--key",
                client_key.to_str().expect("utf8"),
                "-T",
                &b,
                &direct,
            ],
        );
        assert_eq!(code, 400, "direct, try {i}: {body}\n{}", server.log());
        assert!(
            body.contains("larger than the reported available storage"),
            "{body}"
        );
    }
    assert_eq!(
        std::fs::metadata(run.path().join("data/disk.img"))
            .map(|m| m.len())
            .unwrap_or(0),
        0
    );
}

/// `curl` through the proxy at a resumable upload URL, tus's version header and the
/// token set; (status, headers and body).
fn tus(pki: &Pki, args: &[&str]) -> (u16, String) {
    let bearer = bearer(pki);
    let mut all = vec!["-D", "-", "-H", "Tus-Resumable: 1.0.0", "-H", &bearer];
    all.extend_from_slice(args);
    curl(pki, &all)
}

fn upload_offset(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("upload-offset")
            .then(|| v.trim().parse().ok())?
    })
}

#[test]
fn resumable_uploads_under_hostile_clients() {
    let d = tmp();
    let pki = Pki::default();
    let raw = d.path().join("disk.raw");
    raw_fixture(&raw, "8M", &[(0, 8 << 20, 0x3c)]);
    let run = tmp();
    let timeouts = [("FERRYDISK_BODY_IDLE_TIMEOUT", "3")];
    let server = upload_server_with(&pki, run.path(), &timeouts);
    let p = proxy_with(
        &pki,
        run.path(),
        server.port,
        Mode::Standalone,
        "client",
        &timeouts,
        &[],
    );
    let base = format!("https://127.0.0.1:{}/v1beta1/upload-resumable", p.port);
    let (code, text) = tus(&pki, &["-X", "POST", "-H", "Upload-Length: 8388608", &base]);
    assert_eq!(code, 201, "{text}");
    let location = text
        .lines()
        .find_map(|l| l.strip_prefix("location: "))
        .expect("Location")
        .trim()
        .to_string();
    let url = format!("https://127.0.0.1:{}{location}", p.port);
    let patch = |offset: &str, extra: &[&str]| {
        let at = format!("Upload-Offset: {offset}");
        let mut args = vec![
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/offset+octet-stream",
            "-H",
            &at,
        ];
        args.extend_from_slice(extra);
        args.push(&url);
        tus(&pki, &args)
    };
    let small = ["--data-binary", "0123456789"];
    // Offsets that are not plain non-negative integers, or not where the upload is.
    for bad in ["-1", "abc", "1e3", "99999999999999999999999"] {
        let (code, text) = patch(bad, &small);
        assert_eq!(code, 400, "offset {bad}: {text}");
    }
    let (code, text) = patch("9000000000", &small);
    assert_eq!(code, 409, "{text}");
    assert_eq!(upload_offset(&text), Some(0));
    // A body that would go past Upload-Length.
    let big = d.path().join("big");
    std::fs::write(&big, vec![1u8; 9 << 20]).expect("big");
    let big_arg = format!("@{}", big.display());
    let (code, text) = patch("0", &["--data-binary", &big_arg]);
    assert_eq!(code, 413, "{text}");
    // Another version of tus, another content type, an unknown upload.
    let (code, _) = curl(
        &pki,
        &[
            "-I",
            "-H",
            &bearer(&pki),
            "-H",
            "Tus-Resumable: 0.2.2",
            &url,
        ],
    );
    assert_eq!(code, 412);
    let (code, _) = tus(
        &pki,
        &[
            "-X",
            "PATCH",
            "-H",
            "Upload-Offset: 0",
            "--data-binary",
            "x",
            &url,
        ],
    );
    assert_eq!(code, 415);
    let (code, _) = tus(&pki, &["-I", &format!("{base}/0123456789abcdef")]);
    assert_eq!(code, 404);
    let (code, text) = tus(&pki, &["-I", &url]);
    assert_eq!(
        (code, upload_offset(&text)),
        (200, Some(0)),
        "nothing taken"
    );
    // A PATCH that never ends: 1 MiB, then silence; the idle timeout ends it and the
    // upload keeps what came.
    let mut never = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--cacert"])
        .arg(pki.path("ca.crt"))
        .args(["-X", "PATCH", "-T", "-", "-H", "Tus-Resumable: 1.0.0"])
        .args(["-H", &bearer(&pki), "-H", "Upload-Offset: 0"])
        .args(["-H", "Content-Type: application/offset+octet-stream", &url])
        .stdin(Stdio::piped())
        .spawn()
        .expect("curl");
    let mut stdin = never.stdin.take().expect("stdin");
    stdin.write_all(&[0x3c; 1 << 20]).expect("write");
    stdin.flush().expect("flush");
    // A HEAD flood meanwhile: 500 on one connection, every one answered.
    let flood = d.path().join("flood.cfg");
    std::fs::write(
        &flood,
        (0..500)
            .map(|_| format!("url = \"{url}\"\noutput = \"/dev/null\"\n"))
            .collect::<String>(),
    )
    .expect("cfg");
    let started = Instant::now();
    let cpu_before = cpu_seconds(server.child.id());
    let out = Command::new("curl")
        .args(["-sS", "-I", "-w", "%{http_code}\n", "--cacert"])
        .arg(pki.path("ca.crt"))
        .args(["-H", &bearer(&pki), "-H", "Tus-Resumable: 1.0.0", "-K"])
        .arg(&flood)
        .output()
        .expect("curl");
    let codes = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        codes.lines().filter(|c| *c == "200").count(),
        500,
        "{codes}"
    );
    let cpu = cpu_seconds(server.child.id()) - cpu_before;
    eprintln!(
        "500 HEADs in {:.2} s, {cpu:.2} CPU-s of the upload server",
        started.elapsed().as_secs_f64()
    );
    assert!(cpu < 2.0, "{cpu:.2} CPU-s for 500 HEADs");
    // The server ends the silent PATCH by its idle timeout (3 s here).
    let deadline = Instant::now() + Duration::from_secs(15);
    while !server.log().contains("the PATCH broke off") {
        assert!(Instant::now() < deadline, "the silent PATCH was not ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = never.kill();
    let _ = never.wait();
    drop(stdin);
    let (code, text) = tus(&pki, &["-I", &url]);
    assert_eq!((code, upload_offset(&text)), (200, Some(1 << 20)), "{text}");
    // The rest completes the upload.
    let rest = d.path().join("rest");
    std::fs::write(&rest, &std::fs::read(&raw).expect("raw")[1 << 20..]).expect("rest");
    let (code, text) = patch(
        "1048576",
        &["--data-binary", &format!("@{}", rest.display())],
    );
    assert_eq!(code, 204, "{text}\n{}", server.log());
    assert_same_bytes(&run.path().join("data/disk.img"), &raw);
}
