#!/usr/bin/env python3
"""Writes an OCI image layout for ferrydisk's registry tests: layers buildah cannot make
on its own (whiteouts, symlinks or two files as the disk) and multi-arch indexes.
`skopeo copy --all oci:OUT:TAG docker://...` then pushes it to a real registry.

usage: mkimage.py OUT TAG SPEC.json
SPEC: {"index": bool, "images": [{"architecture": "amd64", "env": ["K=V"],
        "layers": [[{"path": "disk/a.raw", "file": "/src"} | {"path": "...", "data": "text"}
                    | {"path": "...", "symlink": "target"}], ...]}]}
An OCI artifact instead (KubeVirt's VEP 256 export, CDI's VEP 395 import): an image with
  {"artifactType": "...", "blobs": [{"file": "/src", "mediaType": "...", "annotations": {}}]}
gets the empty config (application/vnd.oci.empty.v1+json), or "config": {"mediaType", "data"},
and each file as a layer as is. The index may carry "artifactType" and "annotations"; an
empty TAG leaves index.json's entry without a ref name (as VMExport's export.oci.tar).
"""
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

out, tag, spec_path = sys.argv[1], sys.argv[2], sys.argv[3]
spec = json.load(open(spec_path))
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs, exist_ok=True)


def put(data: bytes) -> dict:
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, d), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + d, "size": len(data)}


def layer(entries) -> tuple:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            info = tarfile.TarInfo(e["path"])
            info.mode = 0o644
            if "symlink" in e:
                info.type = tarfile.SYMTYPE
                info.linkname = e["symlink"]
                t.addfile(info)
            elif "file" in e:
                data = open(e["file"], "rb").read()
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                data = e.get("data", "").encode()
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    gz = gzip.compress(raw.getvalue(), mtime=0)
    desc = put(gz)
    desc["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
    return desc, diff_id


manifests = []
for img in spec["images"]:
    if "blobs" in img:
        descs = []
        for b in img["blobs"]:
            d = put(open(b["file"], "rb").read())
            d["mediaType"] = b["mediaType"]
            if b.get("annotations"):
                d["annotations"] = b["annotations"]
            descs.append(d)
        config = img.get("config", {"mediaType": "application/vnd.oci.empty.v1+json", "data": {}})
        cdesc = put(json.dumps(config["data"]).encode() if config["data"] != {} else b"{}")
        cdesc["mediaType"] = config["mediaType"]
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "artifactType": img["artifactType"], "config": cdesc, "layers": descs}
        mdesc = put(json.dumps(manifest).encode())
        mdesc["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
        mdesc["platform"] = {"architecture": img.get("architecture", "amd64"), "os": "linux"}
        manifests.append(mdesc)
        continue
    descs, diffs = [], []
    for entries in img["layers"]:
        d, diff = layer(entries)
        descs.append(d)
        diffs.append(diff)
    config = {
        "architecture": img.get("architecture", "amd64"),
        "os": "linux",
        "config": {"Env": img.get("env", [])},
        "rootfs": {"type": "layers", "diff_ids": diffs},
    }
    if "variant" in img:
        config["variant"] = img["variant"]
    cdesc = put(json.dumps(config).encode())
    cdesc["mediaType"] = "application/vnd.oci.image.config.v1+json"
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": cdesc, "layers": descs}
    mdesc = put(json.dumps(manifest).encode())
    mdesc["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    mdesc["platform"] = {"architecture": config["architecture"], "os": "linux"}
    if "variant" in img:
        mdesc["platform"]["variant"] = img["variant"]
    manifests.append(mdesc)

if spec.get("index"):
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
    for k in ("artifactType", "annotations"):
        if k in spec:
            index[k] = spec[k]
    top = put(json.dumps(index).encode())
    top["mediaType"] = "application/vnd.oci.image.index.v1+json"
else:
    top = dict(manifests[0])
    top.pop("platform", None)
if tag:
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
with open(os.path.join(out, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": [top]}, f)
with open(os.path.join(out, "oci-layout"), "w") as f:
    f.write('{"imageLayoutVersion": "1.0.0"}')
