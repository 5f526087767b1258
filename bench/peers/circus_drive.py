"""Drives a running circusd for roster-bench's spawn scenario.

    circus_drive.py ENDPOINT PUBSUB_ENDPOINT WATCHER N CAP_SECS

Subscribes to the arbiter's events, starts watcher WATCHER (N processes of /bin/true,
respawn off), and waits until N `reap` events of it have arrived. Prints one JSON line:
{"secs": <start command sent -> last reap>, "reaped": <count>}. Stops waiting after
CAP_SECS and reports what it counted by then.
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
sub.setsockopt(zmq.SUBSCRIBE, topic)
time.sleep(0.2)  # a SUB socket drops what is published before it has joined

reaped = 0
start = time.monotonic()
answer = client.call({"command": "start", "properties": {"name": watcher}})
if answer.get("status") != "ok":
    sys.exit("start answered %r" % (answer,))
poller = zmq.Poller()
poller.register(sub, zmq.POLLIN)
deadline = start + cap
while reaped < n and time.monotonic() < deadline:
    if poller.poll(1000):
        sub.recv_multipart()
        reaped += 1
secs = time.monotonic() - start
print(json.dumps({"secs": secs, "reaped": reaped}))
