"""Drives a running circusd for roster-bench's spawn scenario.

    circus_drive.py ENDPOINT PUBSUB_ENDPOINT WATCHER N CAP_SECS

Subscribes to the arbiter's events, starts watcher WATCHER (N processes of /bin/true,
respawn off), and waits until N `reap` events of it have arrived. Prints one JSON line:
{"secs": <start command sent -> last reap>, "reaped": <count>, "start_secs": <start command
sent -> its answer>}. Counts only the reaps that happened within CAP_SECS of the start.

The arbiter is one thread: it forks every process of the watcher before it answers `start`
and reaps none of them until then, so on a loaded machine the answer itself can come after
CAP_SECS. The reaps are then already queued on the SUB socket; they are read after the
answer whatever the time, and each is dated by the arbiter's own `time` field, not by when
this script got to it, so a late answer neither loses them nor stretches the figure.
"""
import json
import sys
import time

import zmq
from circus.client import CircusClient

endpoint, pubsub, watcher, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cap = float(sys.argv[5])
client = CircusClient(endpoint=endpoint, timeout=30)

# The arbiter answers once it is up.
deadline = time.monotonic() + 60
while True:
    try:
        if client.call({"command": "status", "properties": {}}).get("status") == "ok":
            break
    except Exception:  # not up yet
        pass
    if time.monotonic() > deadline:
        sys.exit("circusd did not answer")
    time.sleep(0.05)

ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.connect(pubsub)
topic = ("watcher.%s.reap" % watcher).encode()
# Room for every reap of the round while the script waits for `start` to answer.
sub.setsockopt(zmq.RCVHWM, max(1000, 2 * n))
sub.setsockopt(zmq.SUBSCRIBE, topic)
time.sleep(0.2)  # a SUB socket drops what is published before it has joined

# Long enough for the arbiter to fork every process before it answers.
client = CircusClient(endpoint=endpoint, timeout=max(30.0, 2 * cap))
reaped = 0
last = None
start = time.monotonic()
start_wall = time.time()
answer = client.call({"command": "start", "properties": {"name": watcher}})
if answer.get("status") != "ok":
    sys.exit("start answered %r" % (answer,))
start_secs = time.monotonic() - start
poller = zmq.Poller()
poller.register(sub, zmq.POLLIN)
deadline = start + cap
while reaped < n:
    # Past the cap, only what is already queued is read.
    wait = 1000 if time.monotonic() < deadline else 0
    if not poller.poll(wait):
        if wait == 0:
            break
        continue
    _topic, body = sub.recv_multipart()
    at = json.loads(body)["time"] - start_wall
    if at <= cap:
        reaped += 1
        last = at if last is None else max(last, at)
secs = last if last is not None else time.monotonic() - start
print(json.dumps({"secs": secs, "reaped": reaped, "start_secs": start_secs}))
