#!/usr/bin/env python3
"""A misbehaving remote party for the hostile-server regression tests (issue 27).

Listens on 127.0.0.1 (the server the user named) and on 127.0.0.2 (standing for
"another host"), on ports printed as "PORT <n>" and "PORT2 <n>". Both share one state:
a small in-memory OCI registry (uploads, blobs, manifests) plus endpoints that misbehave
on purpose. Every request is logged to --log as one JSON line: the address it arrived
at, method, path, and the names of the headers that carry secrets.

Misbehaviours (each a flag):
  --basic USER:PASS      the registry wants Basic auth (a 401 challenge first)
  --foreign-location     upload Locations name 127.0.0.2 (another origin)
  --http-location        upload Locations name http:// (with --tls: a downgrade)
  --head-lies            a blob HEAD answers 200 with Content-Length 0
  --digest-lies          a manifest PUT answers Docker-Content-Digest sha256:000...
  --huge-manifest N      GET manifests answers N bytes
  --config-liar N        GET manifests answers a manifest whose 2-byte config is served as N bytes
  --bearer               the registry wants a Bearer token from /token
  --huge-token N         /token answers N bytes
  --huge-error N         starting an upload answers 500 with N bytes
  --silent               every request but GET /v2/ is never answered
  --tls CERT KEY         serve HTTPS on both addresses
  --resumable            keep what a cut PATCH delivered; GET on an upload answers its Range
                         (what zot does; docker-registry 2.8 drops the session instead)
  --relative-location    upload Locations are paths (a proxy in front stays in the path)
Other endpoints: POST /token-redirect answers 307 to 127.0.0.2's /token; POST
/token-silent never answers; GET .../redirect answers 302 to 127.0.0.2's /disk (which
serves --disk).
"""
import argparse
import base64
import hashlib
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("--log", required=True)
p.add_argument("--basic")
p.add_argument("--foreign-location", action="store_true")
p.add_argument("--http-location", action="store_true")
p.add_argument("--head-lies", action="store_true")
p.add_argument("--digest-lies", action="store_true")
p.add_argument("--huge-manifest", type=int, default=0)
p.add_argument("--config-liar", type=int, default=0)
p.add_argument("--bearer", action="store_true")
p.add_argument("--huge-token", type=int, default=0)
p.add_argument("--huge-error", type=int, default=0)
p.add_argument("--silent", action="store_true")
p.add_argument("--tls", nargs=2)
p.add_argument("--disk")
p.add_argument("--resumable", action="store_true")
p.add_argument("--relative-location", action="store_true")
a = p.parse_args()

lock = threading.Lock()
blobs = {}
manifests = {}
uploads = {}
ports = {}
SECRET = {"authorization", "x-secret", "x-amz-security-token", "cookie", "proxy-authorization"}


def log(entry):
    with lock, open(a.log, "a") as f:
        f.write(json.dumps(entry) + "\n")


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def garbage(n, write):
    chunk = b"x" * (1 << 20)
    left = n
    try:
        while left > 0:
            k = min(left, len(chunk))
            write(chunk[:k])
            left -= k
    except (BrokenPipeError, ConnectionResetError):
        pass


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def here(self):
        return self.server.server_address[0]

    def scheme(self):
        return "https" if a.tls else "http"

    def record(self):
        log({
            "at": self.here(),
            "method": self.command,
            "path": self.path,
            "secrets": sorted(k.lower() for k in self.headers.keys() if k.lower() in SECRET),
        })

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            return self.rfile.read(n)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return b""

    def answer(self, code, body=b"", headers=None, length=None):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def authorized(self):
        got = self.headers.get("Authorization", "")
        if a.bearer:
            return got == "Bearer good-token"
        if a.basic:
            return got == "Basic " + base64.b64encode(a.basic.encode()).decode()
        return True

    def challenge(self):
        if a.bearer:
            realm = "%s://127.0.0.1:%d/token" % (self.scheme(), ports["1"])
            value = 'Bearer realm="%s",service="hostile"' % realm
        else:
            value = 'Basic realm="hostile"'
        self.answer(401, b"{}", {"WWW-Authenticate": value})

    def location(self, uid):
        if a.relative_location:
            return "/upload/%s" % uid
        host = "127.0.0.2:%d" % ports["2"] if a.foreign_location else "127.0.0.1:%d" % ports["1"]
        scheme = "http" if a.http_location else self.scheme()
        return "%s://%s/upload/%s" % (scheme, host, uid)

    def handle_any(self):
        self.record()
        path = self.path.split("?")[0]
        if path == "/token-silent":
            time.sleep(3600)
            return
        if path == "/token-redirect":
            self.body()
            return self.answer(307, b"", {"Location": "http://127.0.0.2:%d/token" % ports["2"]})
        if path == "/token":
            self.body()
            if a.huge_token:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(a.huge_token))
                self.end_headers()
                return garbage(a.huge_token, self.wfile.write)
            return self.answer(200, json.dumps({"token": "good-token", "access_token": "good-token"}).encode())
        if path.endswith("/redirect"):
            return self.answer(302, b"", {"Location": "http://127.0.0.2:%d/disk" % ports["2"]})
        if path == "/disk":
            with open(a.disk, "rb") as f:
                data = f.read()
            return self.answer(200, data)
        if path.startswith("/upload/"):
            return self.upload(path[len("/upload/"):])
        if path == "/v2/" or path == "/v2":
            if not self.authorized():
                return self.challenge()
            return self.answer(200, b"{}")
        if a.silent:
            time.sleep(3600)
            return
        if not self.authorized():
            self.body()
            return self.challenge()
        parts = path.split("/")
        if "/blobs/uploads" in path and self.command == "POST":
            self.body()
            if a.huge_error:
                self.send_response(500)
                self.send_header("Content-Length", str(a.huge_error))
                self.end_headers()
                return garbage(a.huge_error, self.wfile.write)
            uid = "u%d" % len(uploads)
            with lock:
                uploads[uid] = bytearray()
            return self.answer(202, b"", {"Location": self.location(uid), "Range": "0-0"})
        if "/blobs/" in path:
            digest = parts[-1]
            if self.command == "HEAD":
                if a.head_lies:
                    return self.answer(200, b"", length=0)
                if digest in blobs:
                    return self.answer(200, b"", length=len(blobs[digest]))
                return self.answer(404, b"")
            if digest in blobs:
                return self.answer(200, blobs[digest])
            if a.config_liar:
                self.send_response(200)
                self.send_header("Content-Length", str(a.config_liar))
                self.end_headers()
                return garbage(a.config_liar, self.wfile.write)
            return self.answer(404, b"")
        if "/manifests/" in path:
            ref = parts[-1]
            if self.command == "PUT":
                data = self.body()
                with lock:
                    manifests[ref] = data
                    manifests[sha(data)] = data
                digest = "sha256:" + "0" * 64 if a.digest_lies else sha(data)
                return self.answer(201, b"", {"Docker-Content-Digest": digest})
            if a.huge_manifest:
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                self.send_header("Content-Length", str(a.huge_manifest))
                self.end_headers()
                return garbage(a.huge_manifest, self.wfile.write)
            if a.config_liar:
                m = {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": sha(b"{}"), "size": 2},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                "digest": sha(b""), "size": 0}],
                }
                return self.answer(200, json.dumps(m).encode(),
                                   {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
            if ref in manifests:
                return self.answer(200, manifests[ref],
                                   {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
            return self.answer(404, b"")
        self.answer(404, b"")

    def upload(self, uid):
        with lock:
            known = uid in uploads
            have = len(uploads[uid]) if known else 0
        if not known:
            self.body()
            return self.answer(404, b'{"errors":[{"code":"BLOB_UPLOAD_UNKNOWN"}]}')
        if self.command == "GET":
            if not a.resumable:
                return self.answer(404, b'{"errors":[{"code":"BLOB_UPLOAD_INVALID"}]}')
            return self.answer(204, b"", {"Location": self.location(uid),
                                          "Range": "0-%d" % max(have - 1, 0)})
        if self.command == "PATCH":
            cr = self.headers.get("Content-Range")
            start = int(cr.split("-")[0]) if cr else have
            if start != have:
                self.body()
                return self.answer(416, b'{"errors":[{"code":"BLOB_UPLOAD_INVALID"}]}')
            n = self.headers.get("Content-Length")
            got = 0
            if n is None:
                data = self.body()
                with lock:
                    uploads[uid] += data
                got = len(data)
            else:
                n = int(n)
                try:
                    while got < n:
                        chunk = self.rfile.read(min(1 << 20, n - got))
                        if not chunk:
                            break
                        with lock:
                            uploads[uid] += chunk
                        got += len(chunk)
                except (ConnectionResetError, OSError):
                    pass
            log({"at": self.here(), "patch": uid, "start": start, "received": got})
            if n is not None and got < n:
                if not a.resumable:
                    with lock:
                        uploads.pop(uid, None)
                self.close_connection = True
                return
            with lock:
                done = len(uploads[uid])
            return self.answer(202, b"", {"Location": self.location(uid), "Range": "0-%d" % max(done - 1, 0)})
        data = self.body()
        with lock:
            uploads[uid] += data
            done = bytes(uploads[uid])
        if self.command == "PUT":
            q = dict(kv.split("=", 1) for kv in self.path.split("?", 1)[1].split("&") if "=" in kv)
            digest = q.get("digest", "").replace("%3A", ":")
            if sha(done) != digest:
                return self.answer(400, b'{"errors":[{"code":"DIGEST_INVALID"}]}')
            with lock:
                blobs[digest] = done
            return self.answer(201, b"", {"Docker-Content-Digest": digest})
        if self.command == "DELETE":
            return self.answer(204, b"")
        self.answer(405, b"")

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any


def serve(host):
    s = ThreadingHTTPServer((host, 0), H)
    s.daemon_threads = True
    if a.tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.tls[0], a.tls[1])
        s.socket = ctx.wrap_socket(s.socket, server_side=True)
    return s


one = serve("127.0.0.1")
two = serve("127.0.0.2")
ports["1"] = one.server_address[1]
ports["2"] = two.server_address[1]
print("PORT %d" % ports["1"], flush=True)
print("PORT2 %d" % ports["2"], flush=True)
threading.Thread(target=two.serve_forever, daemon=True).start()
one.serve_forever()
