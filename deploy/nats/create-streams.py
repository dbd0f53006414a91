#!/usr/bin/env python3
"""Create posfleet's two streams (deploy/nats/streams/*.json) on a NATS cluster, once, before terminals connect.

Needs only nats-py (`pip install 'nats-py>=2.16,<3'`), not posfleet. A collector that finds a stream missing
creates the same definition (collector/cluster/streams.py, which tests/unit/test_nats_deploy.py keeps equal to
these files); running this first makes the order explicit:

1. the MQTT gateway's own stream `$MQTT_msgs` must exist: it is created by the first MQTT connection, so this
   script makes one (a bare MQTT 3.1.1 CONNECT/DISCONNECT to --mqtt) when it is missing, asking again until
   --timeout while the gateway is not listening yet or closes the connection before its CONNACK (right after the
   cluster forms it cannot persist a session yet);
2. POSP and FEED are created from the JSON files (an existing stream is left as it is: the partition count and
   the sources are fixed for its life);
3. it waits until `$MQTT_msgs` has a consumer for each of them. `$MQTT_msgs` has interest retention: a message
   stored there while no consumer exists is deleted at once, after its PUBACK. Let terminals in only after this.

    deploy/nats/create-streams.py --server nats://nats-1:4222 --user posfleet-collector \\
        --password-file /etc/posfleet/credentials/nats-password --mqtt nats-1:1883 \\
        --mqtt-user posfleet-terminal --mqtt-password-file /etc/posfleet/credentials/nats-terminal-password

With the `nats` CLI instead: `nats stream add --config deploy/nats/streams/posp.json` (and feed.json), after one
MQTT connection, then check `nats stream info '$MQTT_msgs'` shows 2 consumers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import nats
from nats.js.api import StreamConfig
from nats.js.errors import APIError, NotFoundError

HERE = Path(__file__).resolve().parent
MQTT_MESSAGES_STREAM = "$MQTT_msgs"


def _mqtt_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class GatewayNotReady(Exception):
    """The MQTT gateway closed the connection before its CONNACK: right after the cluster forms, it cannot persist
    the session yet ("unable to persist session ... timeout" in nats-server's log). Worth asking again."""


def mqtt_touch(host: str, port: int, user: str | None, password: str | None, timeout: float) -> None:
    """One MQTT 3.1.1 CONNECT (clean session), wait for CONNACK, DISCONNECT: the gateway creates its streams.
    Raises GatewayNotReady (worth another try) or SystemExit (a refusal: wrong user or password)."""
    flags = 0x02 | (0x80 if user else 0) | (0x40 if password else 0)
    body = _mqtt_str("MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + _mqtt_str("posfleet-create-streams")
    if user:
        body += _mqtt_str(user)
    if password:
        body += _mqtt_str(password)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            if not chunk:
                raise GatewayNotReady(f"MQTT {host}:{port} closed the connection before CONNACK")
            connack += chunk
        if connack[0] != 0x20 or connack[3] != 0:
            raise SystemExit(f"create-streams: MQTT {host}:{port} refused the connection (CONNACK {connack.hex()})")
        sock.sendall(b"\xe0\x00")


def load_configs(directory: Path) -> list[StreamConfig]:
    """The stream definitions, one JSON file each (the JetStream API's StreamConfig)."""
    files = sorted(directory.glob("*.json"))
    if not files:
        raise SystemExit(f"create-streams: no *.json in {directory}")
    return [StreamConfig.from_response(json.loads(f.read_text())) for f in files]


async def add_stream(js: Any, cfg: StreamConfig, deadline: float) -> None:
    """Create a stream, asking again while the cluster is still placing its peers: right after a start the meta
    leader can report "no suitable peers for placement, peer offline" (err_code 10005) for a few seconds."""
    while True:
        try:
            await js.add_stream(cfg)
            return
        except APIError as err:
            if err.err_code != 10005 or time.monotonic() > deadline:
                raise
            print(f"create-streams: {cfg.name}: {err.description}; asking again")
            await asyncio.sleep(1.0)


def _secret(path: str | None, env: str) -> str | None:
    if path:
        return Path(path).read_text().strip()
    return os.environ.get(env) or None


async def create(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {"servers": args.server, "connect_timeout": 10}
    password = _secret(args.password_file, "POSFLEET_NATS_PASSWORD")
    if args.user:
        options.update(user=args.user, password=password)
    if args.creds:
        options["user_credentials"] = args.creds
    if args.tls_ca:
        import ssl

        options["tls"] = ssl.create_default_context(cafile=args.tls_ca)
    nc = await nats.connect(**options)
    try:
        js = nc.jetstream(timeout=args.timeout)
        deadline = time.monotonic() + args.timeout
        try:
            await js.stream_info(MQTT_MESSAGES_STREAM)
        except NotFoundError:
            host, _, port = args.mqtt.rpartition(":")
            print(f"create-streams: {MQTT_MESSAGES_STREAM} missing: one MQTT connection to {args.mqtt}")
            mqtt_password = _secret(args.mqtt_password_file, "POSFLEET_NATS_MQTT_PASSWORD")
            touched = False
            while True:
                if not touched:
                    try:
                        await asyncio.to_thread(mqtt_touch, host or "127.0.0.1", int(port), args.mqtt_user,
                                                mqtt_password, args.timeout)
                        touched = True
                    except (GatewayNotReady, OSError) as err:  # not listening yet, or not able to hold a session
                        if time.monotonic() > deadline:
                            raise SystemExit(f"create-streams: {err}; gave up after {args.timeout:g} s") from None
                        print(f"create-streams: {err}; trying again")
                try:
                    await js.stream_info(MQTT_MESSAGES_STREAM)  # a failed connection may have created it anyway
                    break
                except NotFoundError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"create-streams: {MQTT_MESSAGES_STREAM} not created in time") from None
                    await asyncio.sleep(0.2 if touched else 1.0)
        configs = load_configs(Path(args.streams))
        for cfg in configs:
            assert cfg.name is not None
            try:
                info = await js.stream_info(cfg.name)
                print(f"create-streams: {cfg.name} exists ({info.state.messages} messages): left as it is")
            except NotFoundError:
                await add_stream(js, cfg, deadline)
                print(f"create-streams: {cfg.name} created ({cfg.num_replicas} replicas)")
        while (await js.stream_info(MQTT_MESSAGES_STREAM)).state.consumer_count < len(configs):
            if time.monotonic() > deadline:
                raise SystemExit(f"create-streams: the sources on {MQTT_MESSAGES_STREAM} did not start in time")
            await asyncio.sleep(0.2)
        print(f"create-streams: {len(configs)} streams sourcing from {MQTT_MESSAGES_STREAM}: terminals may connect")
        return 0
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", action="append", help="NATS URL (repeatable); default nats://127.0.0.1:4222")
    ap.add_argument("--user", help="NATS user (deploy/nats/auth.conf: posfleet-collector)")
    ap.add_argument("--password-file", help="its password (default: $POSFLEET_NATS_PASSWORD)")
    ap.add_argument("--creds", help="a .creds file instead of user/password")
    ap.add_argument("--tls-ca", help="CA file when the servers use TLS")
    ap.add_argument("--mqtt", default="127.0.0.1:1883", help="HOST:PORT of one node's MQTT listener")
    ap.add_argument("--mqtt-user", help="an MQTT user (auth.conf: posfleet-terminal)")
    ap.add_argument("--mqtt-password-file", help="its password (default: $POSFLEET_NATS_MQTT_PASSWORD)")
    ap.add_argument("--streams", default=str(HERE / "streams"), help="directory of the stream JSON files")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds for each wait and API call")
    args = ap.parse_args(argv)
    args.server = args.server or ["nats://127.0.0.1:4222"]
    return asyncio.run(create(args))


if __name__ == "__main__":
    sys.exit(main())
