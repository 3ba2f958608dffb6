#!/usr/bin/env python3
"""A TCP proxy on 127.0.0.1 that cuts the first --drops connections which carry more
than --after bytes back to the client: a network that breaks mid-download.
Prints "PORT <n>" once listening.

usage: dropproxy.py --to PORT --after BYTES --drops N
"""
import argparse
import socket
import threading

p = argparse.ArgumentParser()
p.add_argument("--to", type=int, required=True)
p.add_argument("--after", type=int, required=True)
p.add_argument("--drops", type=int, required=True)
a = p.parse_args()
lock = threading.Lock()
left = [a.drops]


def pipe(src, dst, limit):
    sent = 0
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if limit is not None and sent + len(data) > limit:
                with lock:
                    cut = left[0] > 0
                    if cut:
                        left[0] -= 1
                if cut:
                    dst.sendall(data[: limit - sent])
                    break
                limit = None
            dst.sendall(data)
            sent += len(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(64)
print("PORT %d" % srv.getsockname()[1], flush=True)
while True:
    c, _ = srv.accept()
    u = socket.create_connection(("127.0.0.1", a.to))
    threading.Thread(target=pipe, args=(c, u, None), daemon=True).start()
    threading.Thread(target=pipe, args=(u, c, a.after), daemon=True).start()
