#!/usr/bin/env python3
"""A Google Cloud Storage stand-in on 127.0.0.1 (no real GCS can run here): the XML
API's GET /BUCKET/OBJECT and the JSON API's GET /storage/v1/b/BUCKET/o/OBJECT?alt=media
for files under --dir/BUCKET/OBJECT, with ETag, Range and If-Match as GCS answers them;
and the OAuth token endpoint POST /token, which checks an RS256 JWT-bearer assertion
against --public-key (the test service account's) and hands out tokens. Objects under
the bucket named "public" need no token; every other object does.
Prints "PORT <n>" once listening.

usage: gcs.py --dir DIR --public-key PEM --email SA_EMAIL
"""
import argparse
import base64
import hashlib
import json
import os
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

p = argparse.ArgumentParser()
p.add_argument("--dir", required=True)
p.add_argument("--public-key", required=True)
p.add_argument("--email", required=True)
a = p.parse_args()
with open(a.public_key, "rb") as f:
    public = serialization.load_pem_public_key(f.read())
tokens = set()
lock = threading.Lock()
log = open(os.path.join(a.dir, "requests.log"), "a", buffering=1)


def b64d(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(n).decode())
        if self.path != "/token":
            return self.reply(404)
        try:
            assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
            h, c, s = form["assertion"][0].split(".")
            assert json.loads(b64d(h))["alg"] == "RS256"
            public.verify(b64d(s), (h + "." + c).encode(), padding.PKCS1v15(), hashes.SHA256())
            claims = json.loads(b64d(c))
            assert claims["iss"] == a.email, "iss"
            assert "devstorage" in claims["scope"], "scope"
            assert claims["aud"].endswith("/token"), "aud"
            assert claims["iat"] <= time.time() + 60 < claims["exp"] + 60, "time"
        except Exception as e:  # noqa: BLE001 - any defect is a refusal
            log.write("token refused: %r\n" % (e,))
            return self.reply(400, b'{"error":"invalid_grant"}', [("Content-Type", "application/json")])
        t = "ya29.test-" + secrets.token_hex(8)
        with lock:
            tokens.add(t)
        log.write("token issued\n")
        body = json.dumps({"access_token": t, "expires_in": 3599, "token_type": "Bearer"}).encode()
        self.reply(200, body, [("Content-Type", "application/json")])

    def do_GET(self):
        u = urllib.parse.urlsplit(self.path)
        parts = u.path.lstrip("/").split("/")
        if parts[:3] == ["storage", "v1", "b"] and len(parts) >= 5 and parts[4] == "o":
            bucket, obj = parts[3], urllib.parse.unquote("/".join(parts[5:]))
            if "alt=media" not in u.query:
                return self.reply(400)
        else:
            bucket, obj = parts[0], urllib.parse.unquote("/".join(parts[1:]))
        auth = self.headers.get("Authorization", "")
        with lock:
            ok = bucket == "public" or (auth.startswith("Bearer ") and auth[7:] in tokens)
        log.write("GET %s auth=%s range=%s\n" % (u.path, "ok" if ok else "no", self.headers.get("Range")))
        if not ok:
            return self.reply(401, b"<Error><Code>AuthenticationRequired</Code></Error>")
        path = os.path.join(a.dir, bucket, obj)
        if not os.path.isfile(path):
            return self.reply(404, b"<Error><Code>NoSuchKey</Code></Error>")
        st = os.stat(path)
        etag = '"%s"' % hashlib.md5(("%d-%d" % (st.st_mtime_ns, st.st_size)).encode()).hexdigest()
        if self.headers.get("If-Match") not in (None, etag):
            return self.reply(412, b"<Error><Code>ConditionNotMet</Code></Error>")
        start, size = 0, st.st_size
        rng = self.headers.get("Range")
        code = 200
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
            code = 206
        self.send_response(code)
        self.send_header("ETag", etag)
        self.send_header("x-goog-generation", str(st.st_mtime_ns))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(size - start))
        if code == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, size - 1, size))
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                try:
                    self.wfile.write(b)
                except OSError:
                    return


srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
srv.daemon_threads = True
print("PORT %d" % srv.server_address[1], flush=True)
srv.serve_forever()
