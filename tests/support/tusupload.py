#!/usr/bin/env python3
"""Uploads FILE with tuspy (the tus project's Python client), as a user would: create
the upload at URL, send it in CHUNK-byte PATCHes, and on a failed PATCH ask the server
for its offset (HEAD) and go on from there, up to RETRIES times per chunk.

usage: tusupload.py --url URL --token TOKEN --file FILE [--chunk N] [--retries N]
                    [--checksum sha256:HEX] [--upload-checksum]

The CA comes from REQUESTS_CA_BUNDLE. Prints "URL <location>" once created, and
"DONE <offset>" at the end; a failure prints the server's status and text and exits 1.
"""
import argparse
import sys

from tusclient import client
from tusclient.exceptions import TusCommunicationError, TusUploadFailed

p = argparse.ArgumentParser()
p.add_argument("--url", required=True)
p.add_argument("--token", required=True)
p.add_argument("--file", required=True)
p.add_argument("--chunk", type=int, default=sys.maxsize)
p.add_argument("--retries", type=int, default=5)
p.add_argument("--checksum")
p.add_argument("--upload-checksum", action="store_true")
a = p.parse_args()

c = client.TusClient(a.url, headers={"Authorization": "Bearer " + a.token})
meta = {"filename": a.file.rsplit("/", 1)[-1]}
if a.checksum:
    meta["checksum"] = a.checksum
u = c.uploader(
    a.file,
    chunk_size=a.chunk,
    retries=a.retries,
    retry_delay=0,
    metadata=meta,
    upload_checksum=a.upload_checksum,
)
try:
    u.set_url(u.create_url())
    print("URL", u.url, flush=True)
    u.upload()
except (TusUploadFailed, TusCommunicationError) as e:
    body = getattr(e, "response_content", b"") or b""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    print("FAILED", getattr(e, "status_code", None), body, flush=True)
    sys.exit(1)
print("DONE", u.offset, flush=True)
