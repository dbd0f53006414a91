"""Does the broker keep to its in-flight window? Count QoS 1 messages a subscriber receives before and after
single PUBACKs.

A subscriber with manual acknowledgements subscribes, a publisher puts `--backlog` QoS 1 messages behind it, and
the subscriber acknowledges one message at a time: a broker that keeps its window of W sends W, then one more
per PUBACK. Mosquitto 2.0.11 (Debian 12) sends a new window per PUBACK (docs/performance.md).

    mosquitto -c <conf with max_inflight_messages 20> &
    .venv/bin/python bench/probe_broker_window.py --port 1883
"""

from __future__ import annotations

import argparse
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--backlog", type=int, default=2000)
    ap.add_argument("--acks", type=int, default=3)
    ap.add_argument("--settle-s", type=float, default=0.5, help="time given to the broker after each step")
    args = ap.parse_args()
    got: list[int] = []
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"window-probe-{time.time_ns()}", manual_ack=True)
    sub.on_message = lambda _c, _u, m: got.append(m.mid)
    sub.connect(args.host, args.port)
    sub.subscribe("posfleet/window-probe/#", 1)
    sub.loop_start()
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"window-probe-pub-{time.time_ns()}")
    pub.connect(args.host, args.port)
    pub.loop_start()
    time.sleep(args.settle_s)
    infos = [pub.publish(f"posfleet/window-probe/{i}", b"x", qos=1) for i in range(args.backlog)]
    for info in infos:
        info.wait_for_publish(30)
    time.sleep(args.settle_s)
    print(f"received before any PUBACK: {len(got)}")
    for k in range(args.acks):
        sub.ack(got[k], 1)
        time.sleep(args.settle_s)
        print(f"received after {k + 1} single PUBACK(s): {len(got)}")
    for c in (sub, pub):
        c.loop_stop()
        c.disconnect()


if __name__ == "__main__":
    main()
