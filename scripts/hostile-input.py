#!/usr/bin/env python3
"""Hostile clients for scripts/measure-hostile-input.sh (standard library only).

  bigbody --port P --bytes N [--chunked]   one request with an N-byte JSON body, sent in 1 MiB
                                           writes; prints the response status line
  stall --port P --conns N --announce B    N connections announcing B bytes of body, each
        [--hold S]                         sending 4 KiB, then 4 KiB more, then nothing;
                                           prints "ready" and holds them S seconds
  flood --port P --count N [--threads T]   N completions with unique model names; prints the
                                           count per status
"""

import argparse
import http.client
import socket
import sys
import threading
import time


def bigbody(a):
    s = socket.create_connection(("127.0.0.1", a.port))
    head = b'{"model":"m","prompt":"'
    tail = b'"}'
    total = a.bytes
    hdr = "POST /v1/completions HTTP/1.1\r\nHost: hostile\r\nContent-Type: application/json\r\n"
    hdr += "Transfer-Encoding: chunked\r\n" if a.chunked else f"Content-Length: {total}\r\n"
    s.sendall((hdr + "\r\n").encode())
    filler = b"x" * (1 << 20)

    def pieces():
        yield head
        left = total - len(head) - len(tail)
        while left > 0:
            k = min(len(filler), left)
            yield filler[:k]
            left -= k
        yield tail

    sent = 0
    try:
        for p in pieces():
            if a.chunked:
                s.sendall(b"%x\r\n" % len(p) + p + b"\r\n")
            else:
                s.sendall(p)
            sent += len(p)
        if a.chunked:
            s.sendall(b"0\r\n\r\n")
    except OSError as e:
        print(f"stopped sending after {sent} bytes: {e.__class__.__name__}", file=sys.stderr)
    s.settimeout(120)
    try:
        resp = s.recv(4096).decode(errors="replace")
    except OSError as e:
        resp = f"no response ({e.__class__.__name__})"
    lines = resp.split("\r\n")
    body = resp.split("\r\n\r\n", 1)[1][:120] if "\r\n\r\n" in resp else ""
    print(f"{lines[0]} | sent {sent} of {total} bytes | {body}")


def stall(a):
    conns = []
    hdr = (
        "POST /v1/completions HTTP/1.1\r\nHost: hostile\r\nContent-Type: application/json\r\n"
        f"Content-Length: {a.announce}\r\n\r\n"
    ).encode()
    chunk = b"x" * 4096
    for _ in range(a.conns):
        s = socket.create_connection(("127.0.0.1", a.port))
        s.sendall(hdr + b'{"model":"m","prompt":"' + chunk)
        conns.append(s)
    time.sleep(0.5)
    for s in conns:
        s.sendall(chunk)
    print("ready", flush=True)
    time.sleep(a.hold)
    for s in conns:
        s.close()


def flood(a):
    counts = {}
    lock = threading.Lock()

    def worker(start, n):
        c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=60)
        local = {}
        for i in range(start, start + n):
            body = '{"model":"made-up-model-%d","prompt":"hello","max_tokens":1}' % i
            try:
                c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                r = c.getresponse()
                r.read()
                local[r.status] = local.get(r.status, 0) + 1
            except (OSError, http.client.HTTPException):
                local["error"] = local.get("error", 0) + 1
                c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=60)
        with lock:
            for k, v in local.items():
                counts[k] = counts.get(k, 0) + v

    per = a.count // a.threads
    ts = [
        threading.Thread(target=worker, args=(i * per, per + (a.count % a.threads if i == a.threads - 1 else 0)))
        for i in range(a.threads)
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(" ".join(f"{k}:{v}" for k, v in sorted(counts.items(), key=str)))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bigbody")
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--bytes", type=int, required=True)
    b.add_argument("--chunked", action="store_true")
    s = sub.add_parser("stall")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--conns", type=int, default=1000)
    s.add_argument("--announce", type=int, default=64 << 20)
    s.add_argument("--hold", type=float, default=5)
    f = sub.add_parser("flood")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--count", type=int, required=True)
    f.add_argument("--threads", type=int, default=8)
    a = p.parse_args()
    {"bigbody": bigbody, "stall": stall, "flood": flood}[a.cmd](a)


if __name__ == "__main__":
    main()
