#!/usr/bin/env python3
"""A TCP proxy on 127.0.0.1 that cuts the first --drops connections which carry more
than --after bytes back to the client: a network that breaks mid-download.
Prints "PORT <n>" once listening.

usage: dropproxy.py --to PORT --after BYTES --drops N [--cut-file F --hold-file G] [--up]
                    [--stall SECONDS] [--rate BYTES_PER_SECOND]

With --up, the bytes counted and cut are the client's towards PORT instead (an upload
that breaks mid-body).

With --stall, those connections are not cut but go silent for SECONDS after --after
bytes (open, nothing sent either way in that direction), then carry on: a link that
stalls. With --rate, the counted direction is paced to BYTES_PER_SECOND throughout: a
slow link.

With --stats FILE, FILE holds the bytes carried in the counted direction over all
connections so far (and the cuts made), rewritten as they change: what a drop cost.

With --cut-file, F is created at the first cut; with --hold-file, connections made
after a cut wait until G exists: a test changes the source in between, deterministically.
"""
import argparse
import socket
import threading

p = argparse.ArgumentParser()
p.add_argument("--to", type=int, required=True)
p.add_argument("--after", type=int, required=True)
p.add_argument("--drops", type=int, required=True)
p.add_argument("--cut-file")
p.add_argument("--hold-file")
p.add_argument("--up", action="store_true")
p.add_argument("--stall", type=float)
p.add_argument("--rate", type=float)
p.add_argument("--stats")
a = p.parse_args()
carried = [0]
cuts = [0]


def write_stats():
    if not a.stats:
        return
    import os

    tmp = a.stats + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d %d\n" % (carried[0], cuts[0]))
    os.replace(tmp, a.stats)
cut_seen = threading.Event()
lock = threading.Lock()
left = [a.drops]


def pipe(src, dst, limit, counted=False):
    import time

    sent = 0
    start = time.monotonic()
    try:
        while True:
            data = src.recv(16384 if counted and a.rate else 65536)
            if not data:
                break
            if counted and a.rate:
                ahead = (sent + len(data)) / a.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            if limit is not None and sent + len(data) > limit:
                # This connection's turn to break, if any are left: send up to the
                # limit, then cut it or go silent for --stall seconds.
                with lock:
                    hit = left[0] > 0
                    if hit:
                        left[0] -= 1
                if hit:
                    dst.sendall(data[: limit - sent])
                    with lock:
                        carried[0] += limit - sent
                        cuts[0] += 1
                        write_stats()
                    cut_seen.set()
                    if a.cut_file:
                        open(a.cut_file, "w").close()
                    if not a.stall:
                        break
                    time.sleep(a.stall)
                    data = data[limit - sent :]
                    sent = limit
                limit = None
            dst.sendall(data)
            sent += len(data)
            if counted:
                with lock:
                    carried[0] += len(data)
    except OSError:
        pass
    if counted:
        with lock:
            write_stats()
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
write_stats()
print("PORT %d" % srv.getsockname()[1], flush=True)


def serve(c):
    if a.hold_file and cut_seen.is_set():
        import os
        import time

        while not os.path.exists(a.hold_file):
            time.sleep(0.05)
    u = socket.create_connection(("127.0.0.1", a.to))
    up, down = (a.after, None) if a.up else (None, a.after)
    threading.Thread(target=pipe, args=(c, u, up, a.up), daemon=True).start()
    pipe(u, c, down, not a.up)


while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
