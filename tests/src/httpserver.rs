//! The test HTTP server (tests/support/httpserver.py) and the other Python helpers,
//! each on an ephemeral port of 127.0.0.1.

use crate::bins::root;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A port nothing listens on right now, on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The test HTTP server (tests/support/httpserver.py), killed on drop.
pub struct HttpServer {
    child: Child,
    pub port: u16,
}

/// Starts one of the Python helpers in tests/support (each listens on an ephemeral port
/// of 127.0.0.1 and prints `PORT <n>` first); returns it and that port.
pub fn spawn_support(script: &str, args: &[&std::ffi::OsStr]) -> (Child, u16) {
    let mut child = Command::new("python3")
        .arg(root().join("tests/support").join(script))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 {script}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("port line");
    let port = line
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{script}: bad first line {line:?}"));
    (child, port)
}

impl HttpServer {
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let mut args: Vec<&std::ffi::OsStr> = vec!["--dir".as_ref(), dir.as_os_str()];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        let (child, port) = spawn_support("httpserver.py", &args);
        HttpServer { child, port }
    }

    pub fn url(&self, file: &str) -> String {
        format!("http://127.0.0.1:{}/{file}", self.port)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
