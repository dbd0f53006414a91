"""deploy/nats/create-streams.py's one MQTT connection against a loopback peer playing the gateway: which answers
are worth another try (the gateway not ready yet) and which end the script (a refusal)."""

from __future__ import annotations

import importlib.util
import socket
import threading
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "nats" / "create-streams.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("create_streams", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Gateway:
    """Accepts one connection, reads the CONNECT, answers `answer` (nothing: closes), records what came after."""

    def __init__(self, answer: bytes) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.answer = answer
        self.after = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.settimeout(10)
            assert conn.recv(1024)[:1] == b"\x10"  # CONNECT
            if self.answer:
                conn.sendall(self.answer)
                while chunk := conn.recv(16):
                    self.after += chunk
        self.server.close()


def test_a_connection_closed_before_connack_is_worth_another_try(script: ModuleType) -> None:
    # nats-server does this right after the cluster forms ("unable to persist session ... timeout"): CI, 2026-12-02.
    gw = Gateway(b"")
    with pytest.raises(script.GatewayNotReady, match="closed the connection before CONNACK"):
        script.mqtt_touch("127.0.0.1", gw.port, "posfleet-terminal", "pw", 10)
    gw.thread.join(10)


def test_a_refusal_ends_the_script(script: ModuleType) -> None:
    gw = Gateway(b"\x20\x02\x00\x05")  # CONNACK: not authorized
    with pytest.raises(SystemExit, match="refused the connection"):
        script.mqtt_touch("127.0.0.1", gw.port, "posfleet-terminal", "wrong", 10)
    gw.thread.join(10)


def test_an_accepted_connection_is_closed_with_a_disconnect(script: ModuleType) -> None:
    gw = Gateway(b"\x20\x02\x00\x00")
    script.mqtt_touch("127.0.0.1", gw.port, None, None, 10)
    gw.thread.join(10)
    assert gw.after == b"\xe0\x00"
