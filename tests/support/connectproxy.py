#!/usr/bin/env python3
"""An HTTP proxy on 127.0.0.1 that serves CONNECT only (what an https_proxy sees of an
HTTPS request) to targets on 127.0.0.0/8, appending "CONNECT host:port" to --log for
each tunnel it opens and "BYTES host:port <n>" when it closes (n: bytes carried from
the target to the client). Anything else is answered 405. Prints "PORT <n>" once
listening.

usage: connectproxy.py --log FILE
"""
import argparse
import socket
import threading

p = argparse.ArgumentParser()
p.add_argument("--log", required=True)
a = p.parse_args()
lock = threading.Lock()


def pump(src, dst, counted=None):
    try:
        while True:
            b = src.recv(1 << 16)
            if not b:
                break
            dst.sendall(b)
            if counted is not None:
                counted[0] += len(b)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(c):
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        b = c.recv(4096)
        if not b:
            c.close()
            return
        head += b
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    if len(parts) != 3 or parts[0] != "CONNECT":
        c.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
        c.close()
        return
    host, _, port = parts[1].rpartition(":")
    if not host.startswith("127."):
        c.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        c.close()
        return
    with lock, open(a.log, "a") as f:
        f.write(f"CONNECT {host}:{port}\n")
    try:
        u = socket.create_connection((host, int(port)))
    except OSError:
        c.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        c.close()
        return
    c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    rest = head.split(b"\r\n\r\n", 1)[1]
    if rest:
        u.sendall(rest)
    carried = [0]
    down = threading.Thread(target=pump, args=(u, c, carried), daemon=True)
    down.start()
    pump(c, u)
    down.join()
    with lock, open(a.log, "a") as f:
        f.write(f"BYTES {host}:{port} {carried[0]}\n")


s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(64)
print(f"PORT {s.getsockname()[1]}", flush=True)
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
