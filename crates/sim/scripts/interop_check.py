#!/usr/bin/env python3
"""Optional interop check against reference implementations (not part of `cargo test`).

* a real libzmq SUB socket (pyzmq) receives the simulator's KV events and Python's msgpack
  decodes them; a DEALER replays buffered batches from the replay ROUTER;
* prometheus_client's reference text parser parses /metrics.

Setup and run (ports are examples; pick free ones):

    python3 -m venv /tmp/simcheck-venv
    /tmp/simcheck-venv/bin/pip install pyzmq msgpack prometheus_client
    cargo run --release -p llmsched-sim --example serve -- --base-port 28917 --time-scale 20 \
        --kv-events-endpoint 'tcp://*:25917' --kv-events-replay-endpoint 'tcp://*:25918' &
    /tmp/simcheck-venv/bin/python crates/sim/scripts/interop_check.py \
        127.0.0.1:28917 tcp://127.0.0.1:25917 tcp://127.0.0.1:25918
"""
import json, sys, time, urllib.request
import msgpack, zmq
from prometheus_client.parser import text_string_to_metric_families

http, pub, replay = sys.argv[1:4]
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB); sub.connect(pub); sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
time.sleep(0.5)
def post(path, body):
    req = urllib.request.Request(f"http://{http}{path}", data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    return urllib.request.urlopen(req).read()
words = " ".join(["alpha"] * 1) + " " + " ".join(f"w{i}" for i in range(100))
stream = post("/v1/completions", {"prompt": words, "max_tokens": 20, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True})
frames = [f for f in stream.decode().split("\n\n") if f]
assert frames[-1] == "data: [DONE]", frames[-1]
usage = json.loads(frames[-2][6:])["usage"]
print("SSE ok:", len(frames) - 2, "token frames, usage", usage)
got = []
sub.setsockopt(zmq.RCVTIMEO, 2000)
try:
    while True:
        topic, seq, payload = sub.recv_multipart()
        got.append((topic, int.from_bytes(seq, "big"), msgpack.unpackb(payload, raw=False, strict_map_key=False)))
except zmq.Again:
    pass
assert got, "no events received"
topic, seq, batch = got[0]
print("SUB ok:", len(got), "messages; topic", topic, "first seq", seq, "first event tag", batch[1][0][0] if isinstance(batch, list) else batch)
stored = sum(len(ev[1]) for _, _, b in got for ev in b[1] if ev[0] == "BlockStored")
print("  blocks stored:", stored)
d = ctx.socket(zmq.DEALER); d.connect(replay); d.send_multipart([b"", (0).to_bytes(8, "big")])
n = 0
while True:
    _, s, p = d.recv_multipart()
    if int.from_bytes(s, "big") == 2**64 - 1:
        assert p == b""; break
    msgpack.unpackb(p); n += 1
print("replay ok:", n, "batches then end marker")
text = urllib.request.urlopen(f"http://{http}/metrics").read().decode()
fams = list(text_string_to_metric_families(text))
names = {f.name for f in fams}
print("prometheus_client parsed", len(fams), "families, e.g.", sorted(n for n in names if n.startswith("vllm:"))[:6])
ttft = next(f for f in fams if f.name == "vllm:time_to_first_token_seconds")
print("  vllm:time_to_first_token_seconds type", ttft.type, "samples", len(ttft.samples))
