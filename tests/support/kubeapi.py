#!/usr/bin/env python3
"""A stand-in for the Kubernetes API (no API server can run here): serves
GET /api/v1/namespaces/NS/persistentvolumeclaims/NAME (and configmaps) from JSON files
DIR/NS/persistentvolumeclaims/NAME.json, re-read on every request so a test can change
a PVC while the proxy waits. Requires the bearer token given with --token
(`--token @FILE`: the token in FILE, read on every request, so a test can rotate it).
Prints "PORT <n>".
"""
import argparse
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("--dir", required=True)
p.add_argument("--token", required=True)
a = p.parse_args()


class H(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        want = open(a.token[1:]).read().strip() if a.token.startswith("@") else a.token
        if self.headers.get("Authorization") != "Bearer " + want:
            return self.reply(401, b'{"kind":"Status","code":401}')
        parts = self.path.strip("/").split("/")
        # api v1 namespaces NS KIND NAME
        if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"]:
            f = os.path.join(a.dir, parts[3], parts[4], parts[5] + ".json")
            if os.path.isfile(f):
                return self.reply(200, open(f, "rb").read())
        self.reply(404, b'{"kind":"Status","code":404,"reason":"NotFound"}')

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print("PORT %d" % s.server_address[1], flush=True)
s.serve_forever()
