//! A registry token server on 127.0.0.1 (Docker's token authentication, as Docker Hub,
//! Quay and Harbor run it): no token server is packaged for Debian, so this one is
//! written for the tests, and the registry that checks its tokens is the real
//! `docker-registry` (`auth.token`). It signs RS256 JWTs with a self-signed key whose
//! certificate is the registry's `rootcertbundle` (sent as `x5c`), grants each user
//! the actions a policy allows on the scopes asked for, and records every scope asked.

use super::sh;
use base64::Engine;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

pub const SERVICE: &str = "ferrydisk-test-registry";
pub const ISSUER: &str = "ferrydisk-test-issuer";

/// What a user may do: (user, password, repository prefix, actions).
pub type Grant = (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
);

pub struct TokenServer {
    pub port: u16,
    /// The certificate the registry trusts (`rootcertbundle`).
    pub cert: PathBuf,
    /// Every `scope` asked for, with the user (`-` when anonymous).
    pub asked: Arc<Mutex<Vec<String>>>,
}

impl TokenServer {
    pub fn start(dir: &Path, grants: &'static [Grant]) -> Self {
        let key = dir.join("token.key");
        let cert = dir.join("token.crt");
        sh(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=ferrydisk-test-token"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert));
        let der = sh(Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert))
        .stdout;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let pem = std::fs::read(&key).expect("key");
        let signing = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).expect("RSA key");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (signing, x5c, log) = (signing.clone(), b64.clone(), log.clone());
                std::thread::spawn(move || serve(conn, &signing, &x5c, grants, &log));
            }
        });
        TokenServer { port, cert, asked }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// The registry's `auth:` section for this server.
    pub fn registry_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.realm(),
            self.cert.display()
        )
    }

    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().expect("lock").clone()
    }
}

/// `user:password` from a Basic Authorization header.
fn decode_basic(v: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.strip_prefix("Basic ")?.trim())
        .ok()?;
    let (u, p) = std::str::from_utf8(&raw).ok()?.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn serve(
    conn: TcpStream,
    signing: &jsonwebtoken::EncodingKey,
    x5c: &str,
    grants: &[Grant],
    log: &Mutex<Vec<String>>,
) {
    let mut r = BufReader::new(conn.try_clone().expect("clone"));
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut auth = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = Some(v.trim().to_string());
            }
        }
    }
    let user = match auth.as_deref().map(decode_basic) {
        None => None,
        Some(Some((u, p))) if grants.iter().any(|g| g.0 == u && g.1 == p) => Some(u),
        Some(_) => {
            let _ = (&conn).write_all(
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return;
        }
    };
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let mut access = Vec::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if k != "scope" {
            continue;
        }
        // Several scopes may come in one parameter, space-separated.
        for scope in v.split(' ').filter(|s| !s.is_empty()) {
            log.lock()
                .expect("lock")
                .push(format!("{} {scope}", user.as_deref().unwrap_or("-")));
            let mut parts = scope.splitn(3, ':');
            let (Some(kind), Some(name), Some(actions)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let allowed: Vec<&str> = actions
                .split(',')
                .filter(|a| {
                    grants.iter().any(|g| {
                        Some(g.0) == user.as_deref() && name.starts_with(g.2) && g.3.contains(a)
                    })
                })
                .collect();
            access.push(serde_json::json!({"type": kind, "name": name, "actions": allowed}));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": user.as_deref().unwrap_or(""),
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{now}-{}", std::process::id()),
        "access": access,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.x5c = Some(vec![x5c.to_string()]);
    let token = jsonwebtoken::encode(&header, &claims, signing).expect("sign");
    let body =
        serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
    let _ = (&conn).write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}
