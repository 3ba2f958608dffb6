#!/usr/bin/env python3
"""A stand-in for the Kubernetes API (no API server can run here): serves
GET /api/v1/namespaces/NS/persistentvolumeclaims/NAME (and configmaps) from JSON files
DIR/NS/persistentvolumeclaims/NAME.json, re-read on every request so a test can change
a PVC while the proxy waits; also GET and JSON-patch (op "add" on annotations) of
custom objects under /apis/GROUP/VERSION/namespaces/NS/KIND/NAME (DIR/NS/KIND/NAME.json),
each PATCH body appended as one line to DIR/patches.jsonl. Requires the bearer token
given with --token
(`--token @FILE`: the token in FILE, read on every request, so a test can rotate it).
Prints "PORT <n>".
"""
import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("--dir", required=True)
p.add_argument("--token", required=True)
a = p.parse_args()


class H(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def authorized(self):
        want = open(a.token[1:]).read().strip() if a.token.startswith("@") else a.token
        if self.headers.get("Authorization") != "Bearer " + want:
            self.reply(401, b'{"kind":"Status","code":401}')
            return False
        return True

    def object_file(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        # api v1 namespaces NS KIND NAME | apis GROUP VERSION namespaces NS KIND NAME
        if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"]:
            return os.path.join(a.dir, parts[3], parts[4], parts[5] + ".json")
        if len(parts) == 7 and parts[0] == "apis" and parts[3] == "namespaces":
            return os.path.join(a.dir, parts[4], parts[5], parts[6] + ".json")
        return None

    def do_GET(self):
        if not self.authorized():
            return
        f = self.object_file()
        if f and os.path.isfile(f):
            return self.reply(200, open(f, "rb").read())
        self.reply(404, b'{"kind":"Status","code":404,"reason":"NotFound"}')

    def do_PATCH(self):
        if not self.authorized():
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        f = self.object_file()
        if not f or not os.path.isfile(f):
            return self.reply(404, b'{"kind":"Status","code":404,"reason":"NotFound"}')
        if self.headers.get("Content-Type") != "application/json-patch+json":
            return self.reply(415, b'{"kind":"Status","code":415}')
        with open(os.path.join(a.dir, "patches.jsonl"), "ab") as log:
            log.write(body + b"\n")
        obj = json.load(open(f))
        for op in json.loads(body):
            prefix = "/metadata/annotations/"
            if op["op"] != "add" or not op["path"].startswith(prefix):
                return self.reply(422, b'{"kind":"Status","code":422}')
            key = op["path"][len(prefix):].replace("~1", "/").replace("~0", "~")
            obj.setdefault("metadata", {}).setdefault("annotations", {})[key] = op["value"]
        json.dump(obj, open(f, "w"))
        self.reply(200, json.dumps(obj).encode())

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print("PORT %d" % s.server_address[1], flush=True)
s.serve_forever()
