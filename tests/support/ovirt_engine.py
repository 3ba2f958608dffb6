#!/usr/bin/env python3
"""A stand-in for the oVirt engine's REST API (no engine can run here), in front of the
real ovirt-imageio daemon (PyPI ovirt-imageio, started by this script) that serves the
data, as vdsm arranges it on a host: a raw download of a disk or snapshot goes through
qemu-nbd (so the daemon's extents are the image's allocation), a cow download serves the
qcow2 volume's own bytes (the file backend).

    ovirt_engine.py --config CONFIG.json --events EVENTS.jsonl --tls CERT KEY --workdir DIR

prints "PORT <engine port>" once the engine and the daemon listen. CONFIG:

    {"user": "admin@internal", "password": "...",
     "disks": {"<disk id>": {"image_id": "...", "storage_domain": "<sd id>",
                             "total_size": N, "file": PATH, "format": "raw|qcow2",
                             "snapshots": {"<snapshot id>": {"raw": PATH, "raw_format": "raw|qcow2",
                                                              "cow": PATH, "actual_size": N}}}},
     "behaviour": "normal|stuck|fail|locked-once|no-transfer-url",
     "imageio_port": N, "transfer_port": M}

imageio_port fixes the daemon's TLS port (default: a free one); transfer_port is the port
the transfer URLs name (default: the daemon's), e.g. a connection-cutting proxy in front.

The API answers JSON the way the engine renders it (numbers as strings), or XML when the
client asks for it (`Accept: application/xml`, what the oVirt SDKs, and so CDI's
importer, send). Every call that matters is appended to EVENTS as one JSON line: token,
transfer (with format and what it serves), phase polls, finalize, cancel, extend.
"immediate" as behaviour answers a new transfer as `transferring` at once (CDI's
importer creates a transfer again for as long as the answer says `initializing`).
"""
import argparse
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import re
from xml.sax.saxutils import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("--config", required=True)
p.add_argument("--events", required=True)
p.add_argument("--tls", nargs=2, required=True)
p.add_argument("--workdir", required=True)
a = p.parse_args()

cfg = json.load(open(a.config))
behaviour = cfg.get("behaviour", "normal")
lock = threading.Lock()
TOKEN = "token-" + uuid.uuid4().hex
transfers = {}
state = {"locked_once": False}


def die_with_parent():
    # PR_SET_PDEATHSIG: the daemon and qemu-nbd go when the test kills this script.
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)


def event(**kw):
    with lock, open(a.events, "a") as f:
        f.write(json.dumps(kw) + "\n")


def free_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# The real daemon: TLS on 127.0.0.1, its control service on TCP (the engine adds tickets).
remote_port, control_port = cfg.get("imageio_port") or free_port(), free_port()
transfer_port = cfg.get("transfer_port") or remote_port
os.makedirs(os.path.join(a.workdir, "conf.d"), exist_ok=True)
os.makedirs(os.path.join(a.workdir, "run"), exist_ok=True)
with open(os.path.join(a.workdir, "conf.d", "daemon.conf"), "w") as f:
    f.write(f"""[daemon]
drop_privileges = false
systemd_enable = false
run_dir = {a.workdir}/run
poll_interval = 0.1

[tls]
enable = true
key_file = {a.tls[1]}
cert_file = {a.tls[0]}
ca_file = {a.tls[0]}

[remote]
host = 127.0.0.1
port = {remote_port}

[local]
enable = false

[control]
transport = tcp
port = {control_port}

[handlers]
keys = stderr

[logger_root]
handlers = stderr
level = INFO

[handler_stderr]
class = logging.StreamHandler
args = ()
formatter = long
""")
# Started through this interpreter (what `ovirt-imageio` itself runs): the script may not
# be on PATH after a `python3 -m pip install` (pyenv makes its shims on rehash only).
daemon = subprocess.Popen(
    [sys.executable, "-c", "from ovirt_imageio._internal import server; server.main()",
     "--conf-dir", a.workdir],
    stdout=open(os.path.join(a.workdir, "imageio.log"), "w"),
    stderr=subprocess.STDOUT,
    preexec_fn=die_with_parent,
)
nbds = []


def control(method, path, body=None):
    req = urllib.request.Request(
        f"http://127.0.0.1:{control_port}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
    )
    return urllib.request.urlopen(req, timeout=10).read()


for _ in range(100):
    try:
        control("GET", "/tickets/none")
    except urllib.error.HTTPError:
        break  # the control service answers (404 for an unknown ticket)
    except OSError:
        time.sleep(0.1)


# qemu-nbd is started from one thread that lives as long as the engine: the parent-death
# signal is tied to the thread that forked, and request threads come and go.
import queue

spawn_requests = queue.Queue()


def spawner():
    while True:
        argv, done = spawn_requests.get()
        nbds.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=die_with_parent))
        done.set()


threading.Thread(target=spawner, daemon=True).start()


def serve_nbd(path, fmt):
    sock = os.path.join(a.workdir, f"nbd-{uuid.uuid4().hex}.sock")
    done = threading.Event()
    spawn_requests.put((
        ["qemu-nbd", f"--socket={sock}", f"--format={fmt}", "--read-only",
         "--persistent", "--shared=8", "--cache=none", "--aio=threads", path],
        done,
    ))
    done.wait(10)
    for _ in range(100):
        if os.path.exists(sock):
            return f"nbd:unix:{sock}"
        time.sleep(0.05)
    raise RuntimeError("qemu-nbd did not start")


def find_snapshot(sid):
    for disk in cfg["disks"].values():
        if sid in disk.get("snapshots", {}):
            return disk, disk["snapshots"][sid]
    return None, None


def to_xml(tag, obj):
    """The engine's XML for one of the JSON objects below: `id` as an attribute, lists
    under their plural tag, numbers and strings as text."""
    attrs = f' id="{escape(obj["id"])}" href="/ovirt-engine/api/{tag}s/{escape(obj["id"])}"' if "id" in obj else ""
    inner = []
    for k, v in obj.items():
        if k == "id":
            continue
        if isinstance(v, dict):
            # {"storage_domain": [...]} or a nested object
            if len(v) == 1 and isinstance(next(iter(v.values())), list):
                (sub, items), = v.items()
                inner.append(f"<{k}>" + "".join(to_xml(sub, i) for i in items) + f"</{k}>")
            else:
                inner.append(to_xml(k, v))
        else:
            inner.append(f"<{k}>{escape(str(v))}</{k}>")
    return f"<{tag}{attrs}>" + "".join(inner) + f"</{tag}>"


def from_xml(body):
    """The fields of an image transfer request the stand-in reads, from XML."""
    text = body.decode()
    out = {}
    for k in ("direction", "format"):
        m = re.search(rf"<{k}>([^<]*)</{k}>", text)
        if m:
            out[k] = m.group(1)
    for k in ("image", "snapshot"):
        m = re.search(rf'<{k}[^>]*\bid="([^"]+)"', text) or re.search(rf"<{k}>\s*<id>([^<]+)</id>", text)
        if m:
            out[k] = {"id": m.group(1)}
    return out


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def xml(self):
        return "xml" in (self.headers.get("Accept") or "")

    def log_message(self, *args):
        pass

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def send(self, code, obj, tag=None):
        if tag and self.xml():
            data = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>' + to_xml(tag, obj)).encode()
            ctype = "application/xml"
        else:
            data = json.dumps(obj).encode()
            ctype = "application/json"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def fault(self, code, reason, detail):
        self.send(code, {"reason": reason, "detail": detail}, "fault")

    def authorized(self):
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.fault(401, "Unauthorized", "not logged in")
            return False
        return True

    def do_POST(self):
        path = self.path.split("?")[0]
        raw = self.body()
        if path == "/ovirt-engine/sso/oauth/token":
            form = dict(
                kv.split("=", 1) for kv in raw.decode().split("&") if "=" in kv
            )
            from urllib.parse import unquote_plus

            form = {k: unquote_plus(v) for k, v in form.items()}
            event(event="token", user=form.get("username"), grant=form.get("grant_type"))
            if (
                form.get("grant_type") != "password"
                or form.get("username") != cfg["user"]
                or form.get("password") != cfg["password"]
            ):
                return self.send(400, {"error_code": "access_denied",
                                       "error": "Cannot authenticate user 'admin@internal': The username or password is incorrect.."})
            return self.send(200, {"access_token": TOKEN, "token_type": "bearer",
                                   "scope": "ovirt-app-api", "exp": str(int(time.time() * 1000) + 3600000)})
        if not self.authorized():
            return
        if path == "/ovirt-engine/api/imagetransfers":
            req = from_xml(raw) if raw.lstrip().startswith(b"<") else json.loads(raw or b"{}")
            return self.add_transfer(req)
        parts = path.split("/")
        if len(parts) == 6 and parts[3] == "imagetransfers":
            tid, action = parts[4], parts[5]
            t = transfers.get(tid)
            if t is None:
                return self.fault(404, "Not Found", f"transfer {tid}")
            event(event=action, id=tid)
            if action == "finalize":
                t["phase"] = "finished_success"
                control("DELETE", f"/tickets/{t['ticket']}")
            elif action == "cancel":
                t["phase"] = "cancelled"
                control("DELETE", f"/tickets/{t['ticket']}")
            elif action == "extend":
                pass
            else:
                return self.fault(404, "Not Found", action)
            return self.send(200, {"status": "complete"}, "action")
        self.fault(404, "Not Found", path)

    def add_transfer(self, req):
        if behaviour == "locked-once" and not state["locked_once"]:
            state["locked_once"] = True
            event(event="locked")
            return self.fault(409, "Operation Failed", "[Cannot transfer Virtual Disk: Disk is locked. Please try again later.]")
        fmt = req.get("format")
        if "snapshot" in req:
            disk, snap = find_snapshot(req["snapshot"]["id"])
            if snap is None:
                return self.fault(404, "Not Found", "snapshot")
            target = ("snapshot", req["snapshot"]["id"])
            if fmt == "cow":
                url = "file://" + snap["cow"]
            else:
                url = serve_nbd(snap["raw"], snap.get("raw_format", "raw"))
        else:
            disk = cfg["disks"].get(req.get("image", {}).get("id"))
            if disk is None:
                return self.fault(404, "Not Found", "disk")
            target = ("disk", req["image"]["id"])
            url = serve_nbd(disk["file"], disk.get("format", "raw")) if fmt == "raw" else "file://" + disk["file"]
        size = os.path.getsize(url[7:]) if url.startswith("file://") else int(disk["total_size"])
        ticket = uuid.uuid4().hex
        control("PUT", f"/tickets/{ticket}", {
            "uuid": ticket, "size": size, "url": url, "timeout": 300,
            "ops": ["read"], "inactivity_timeout": 60,
        })
        tid = uuid.uuid4().hex
        phase = "transferring" if behaviour == "immediate" else "initializing"
        transfers[tid] = {"phase": phase, "ticket": ticket, "polls": 0}
        event(event="transfer", id=tid, format=fmt, target=target[0], target_id=target[1],
              direction=req.get("direction"), backend="nbd" if url.startswith("nbd:") else "file")
        self.send(201, self.transfer_json(tid), "image_transfer")

    def transfer_json(self, tid):
        t = transfers[tid]
        images = f"https://127.0.0.1:{transfer_port}/images/{t['ticket']}"
        out = {"id": tid, "phase": t["phase"], "direction": "download",
               "proxy_url": images, "inactivity_timeout": "60"}
        if behaviour != "no-transfer-url":
            out["transfer_url"] = images
        return out

    def do_GET(self):
        path = self.path.split("?")[0]
        if not self.authorized():
            return
        if path.rstrip("/") == "/ovirt-engine/api":
            return self.send(200, {"product_info": {"name": "stand-in", "version": {"major": "4", "minor": "5"}}}, "api")
        parts = path.split("/")
        if len(parts) == 5 and parts[3] == "disks":
            disk = cfg["disks"].get(parts[4])
            if disk is None:
                return self.fault(404, "Not Found", f"disk {parts[4]}")
            return self.send(200, {
                "id": parts[4], "image_id": disk["image_id"],
                "total_size": str(disk["total_size"]),
                "provisioned_size": str(disk["total_size"]),
                "actual_size": str(disk["total_size"]),
                "storage_domains": {"storage_domain": [{"id": disk["storage_domain"]}]},
            }, "disk")
        if len(parts) == 6 and parts[3] == "storagedomains" and parts[5] == "disksnapshots":
            snaps = []
            for disk_id, disk in cfg["disks"].items():
                if disk["storage_domain"] != parts[4]:
                    continue
                for sid, snap in disk.get("snapshots", {}).items():
                    snaps.append({"id": sid, "actual_size": str(snap.get("actual_size", 0)),
                                  "disk": {"id": disk_id}})
            if self.xml():
                body = "".join(to_xml("disk_snapshot", x) for x in snaps)
                data = f"<disk_snapshots>{body}</disk_snapshots>".encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return self.wfile.write(data)
            return self.send(200, {"disk_snapshot": snaps})
        if len(parts) == 5 and parts[3] == "imagetransfers":
            t = transfers.get(parts[4])
            if t is None:
                return self.fault(404, "Not Found", "transfer")
            t["polls"] += 1
            if t["phase"] == "initializing" and t["polls"] >= 2:
                t["phase"] = {"stuck": "initializing", "fail": "finished_failure"}.get(behaviour, "transferring")
            event(event="poll", id=parts[4], phase=t["phase"])
            return self.send(200, self.transfer_json(parts[4]), "image_transfer")
        self.fault(404, "Not Found", path)


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(a.tls[0], a.tls[1])
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(f"PORT {srv.server_address[1]}", flush=True)
try:
    srv.serve_forever()
finally:
    daemon.terminate()
    for n in nbds:
        n.terminate()
