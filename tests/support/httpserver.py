#!/usr/bin/env python3
"""A deliberately misbehaving HTTP file server for ferrydisk's end-to-end tests.

Serves files from --dir on 127.0.0.1 (ephemeral port, printed as "PORT <n>" on stdout)
with ETag/Last-Modified, Range and If-Range, and knobs to break things the way real
servers and networks do: drop the connection mid-body, send short bodies, refuse ranges,
require basic auth, throttle.
"""
import argparse
import base64
import hashlib
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from email.utils import formatdate

p = argparse.ArgumentParser()
p.add_argument("--dir", required=True)
p.add_argument("--auth", help="user:password required as basic auth")
p.add_argument("--no-range", action="store_true", help="no Accept-Ranges, ignore Range")
p.add_argument("--drop-after", type=int, default=0, help="close after this many body bytes")
p.add_argument("--drops", type=int, default=0, help="how many GET responses are dropped")
p.add_argument("--short", action="store_true", help="every body stops at half its Content-Length")
p.add_argument("--rate", type=int, default=0, help="bytes per second per response")
p.add_argument("--log", help="append one line per request here")
p.add_argument("--swap", help="after the first dropped response, serve this file's bytes instead (the file changed)")
p.add_argument("--validators", default="both", choices=["both", "etag", "weak", "lastmod", "none"],
               help="which validators responses carry")
p.add_argument("--ignore-if-range", action="store_true", help="answer every Range with 206, whatever If-Range says")
p.add_argument("--redirect-loop", action="store_true", help="/loop redirects to itself")
p.add_argument("--redirect-to", help="/redirect answers 302 to this URL")
args = p.parse_args()

lock = threading.Lock()
state = {"drops_left": args.drops, "swapped": False}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *a):
        if args.log:
            with open(args.log, "a") as f:
                f.write("%s %s range=%s\n" % (self.command, self.path, self.headers.get("Range")))

    def authorized(self):
        if not args.auth:
            return True
        want = "Basic " + base64.b64encode(args.auth.encode()).decode()
        return self.headers.get("Authorization") == want

    def do_HEAD(self):
        self.serve(head=True)

    def do_GET(self):
        self.serve(head=False)

    def serve(self, head):
        if not self.authorized():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if args.redirect_loop and self.path.startswith("/loop"):
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if args.redirect_to and self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", args.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = os.path.join(args.dir, self.path.lstrip("/").split("?")[0])
        with lock:
            if state["swapped"] and args.swap:
                path = args.swap
        if not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        st = os.stat(path)
        size = st.st_size
        etag = '"%s"' % hashlib.md5(("%d-%d" % (st.st_mtime_ns, size)).encode()).hexdigest()
        start = 0
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if args.validators == "weak":
            etag = "W/" + etag
        lastmod = formatdate(st.st_mtime, usegmt=True)
        range_ok = if_range is None or if_range in (etag, lastmod) or args.ignore_if_range
        if rng and not args.no_range and rng.startswith("bytes=") and range_ok:
            start = int(rng[len("bytes="):].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, size - 1, size))
        else:
            self.send_response(200)
        length = size - start
        self.send_header("Content-Length", str(length))
        if args.validators in ("both", "etag", "weak"):
            self.send_header("ETag", etag)
        if args.validators in ("both", "lastmod"):
            self.send_header("Last-Modified", lastmod)
        if not args.no_range:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if head:
            return
        limit = length
        with lock:
            if state["drops_left"] > 0:
                state["drops_left"] -= 1
                limit = min(length, args.drop_after)
                state["swapped"] = True
        if args.short:
            limit = min(limit, length // 2)
        sent = 0
        t0 = time.monotonic()
        with open(path, "rb") as f:
            f.seek(start)
            while sent < limit:
                chunk = f.read(min(256 * 1024, limit - sent))
                if not chunk:
                    break
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(chunk)
                if args.rate:
                    ahead = sent / args.rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        if sent < length:
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print("PORT %d" % server.server_address[1], flush=True)
server.serve_forever()
