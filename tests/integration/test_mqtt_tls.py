"""MQTT over TLS with a private CA and client certificates (real Mosquitto with `require_certificate`), and
connection failures that are logged with their cause, rate limited, instead of retried in silence."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness.core import (
    ROOT,
    Process,
    free_port,
    http_get,
    http_json,
    port_open,
    require_binary,
    running,
    start_collector,
    start_mosquitto,
    wait_until,
    write_collector_config,
)

pytestmark = pytest.mark.integration

TID = "T00001"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_binary("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> dict[str, Path]:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=posfleet test CA",
            cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def start_tls_mosquitto(workdir: Path, pki: dict[str, Path]) -> Process:
    """Mosquitto with one TLS listener that requires a client certificate signed by the test CA."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        "user root\n"  # only when started as root: keep reading the certificates in the private temp dir
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        f"cafile {pki['ca.pem']}\ncertfile {pki['server.pem']}\nkeyfile {pki['server.key']}\n"
        "require_certificate true\n"
        "max_inflight_messages 1000\n"
        "log_dest stderr\n"
    )
    log = workdir / "mosquitto.log"
    proc = subprocess.Popen([require_binary("mosquitto"), "-c", str(conf)], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT)
    broker = Process(proc, port, workdir, log)
    try:
        wait_until(lambda: port_open(port), 10, "mosquitto (TLS) to listen")
    except TimeoutError:
        broker.stop()
        raise RuntimeError(f"mosquitto did not start:\n{broker.log_text()}") from None
    return broker


def spawn_collector(workdir: Path, config: Path, http_port: int) -> Process:
    """`posfleet run` without waiting for readiness (it is not expected to get there at once)."""
    log = workdir / "collector.log"
    proc = subprocess.Popen([sys.executable, "-m", "collector.cli", "run", "--config", str(config)], cwd=ROOT,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    return Process(proc, http_port, workdir, log)


def publish_heartbeat(port: int, pki: dict[str, Path]) -> None:
    """One QoS 1 heartbeat through the TLS listener, as a terminal with its own client certificate."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="terminal-T00001")
    client.tls_set(ca_certs=str(pki["ca.pem"]), certfile=str(pki["client.pem"]), keyfile=str(pki["client.key"]))
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        body = {"tid": TID, "ts": time.time(), "seq": 1, "interval_s": 30, "txn_count": 0, "uploaded_count": 0,
                "queue_depth": 0, "oldest_queued_ts": None}
        client.publish(f"pos/v1/{TID}/heartbeat", json.dumps(body), qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def registry(tmp_path: Path) -> None:
    (tmp_path / "terminals.csv").write_text(
        f"terminal_id,merchant_id,acquirer,model,site,region\n{TID},M1,acq-a,A920,s0,r\n")


def test_private_ca_and_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    registry(tmp_path)
    with running(start_tls_mosquitto(tmp_path / "broker", pki)) as broker:
        # 1. With the CA and the client certificate: connected, subscribed, a heartbeat is ingested.
        http_port = free_port()
        tls = {"ca_file": str(pki["ca.pem"]), "cert_file": str(pki["client.pem"]), "key_file": str(pki["client.key"])}
        config = write_collector_config(tmp_path, broker.port, http_port,
                                        mqtt={"url": f"mqtts://127.0.0.1:{broker.port}", "tls": tls,
                                              "client_id": "posfleet-tls"})
        with running(start_collector(tmp_path, config, http_port)):
            publish_heartbeat(broker.port, pki)
            wait_until(lambda: http_json(f"http://127.0.0.1:{http_port}/api/v1/terminals/{TID}")
                       ["last_heartbeat_received"], 15, "the heartbeat over TLS")

        # 2. The CA but no client certificate: the broker refuses it, the log says why, never ready.
        other = tmp_path / "nocert"
        other.mkdir()
        registry(other)
        http_port = free_port()
        config = write_collector_config(other, broker.port, http_port,
                                        mqtt={"url": f"mqtts://127.0.0.1:{broker.port}",
                                              "tls": {"ca_file": str(pki["ca.pem"])}, "client_id": "posfleet-nocert"})
        with running(spawn_collector(other, config, http_port)) as collector:
            wait_until(lambda: "MQTT" in collector.log_text() and "certificate" in collector.log_text().lower(), 20,
                       "the log to name the missing certificate")
            assert http_get(f"http://127.0.0.1:{http_port}/readyz")[0] == 503
        text = collector.log_text()
        where = rf"127\.0\.0\.1:{broker.port}"
        assert re.search(rf"WARNING collector\.ingest\.mqtt: MQTT {where}: .*certificate required", text), text
        assert "Traceback" not in text and "Client is not connected" not in text  # nothing about our own stop

        # 3. No CA for a private broker: the system's trust store does not know it; the log says so.
        third = tmp_path / "noca"
        third.mkdir()
        registry(third)
        http_port = free_port()
        config = write_collector_config(third, broker.port, http_port,
                                        mqtt={"url": f"mqtts://127.0.0.1:{broker.port}", "client_id": "posfleet-noca"})
        with running(spawn_collector(third, config, http_port)) as collector:
            wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in collector.log_text(), 20, "certificate verify failed")


def test_a_broker_down_at_start_is_logged_rate_limited_then_connected(tmp_path: Path) -> None:
    registry(tmp_path)
    mqtt_port, http_port = free_port(), free_port()
    config = write_collector_config(tmp_path, mqtt_port, http_port, mqtt={"reconnect_min_s": 1, "reconnect_max_s": 1})
    started = time.monotonic()
    with running(spawn_collector(tmp_path, config, http_port)) as collector:
        wait_until(lambda: f"MQTT connect to 127.0.0.1:{mqtt_port} failed" in collector.log_text(), 20,
                   "the first connect failure in the log")
        assert "Connection refused" in collector.log_text()
        assert http_get(f"http://127.0.0.1:{http_port}/readyz")[0] == 503
        with running(start_mosquitto(tmp_path / "broker", port=mqtt_port)):
            wait_until(lambda: http_get(f"http://127.0.0.1:{http_port}/readyz")[0] == 200, 30, "ready once the "
                       "broker is up")
            elapsed = time.monotonic() - started
            text = collector.log_text()
    failures = len(re.findall(r"MQTT connect to .* failed", text))
    match = re.search(rf"MQTT connected to 127\.0\.0\.1:{mqtt_port} after (\d+) failed attempts", text)
    assert match, text
    attempts = int(match.group(1))
    assert failures >= 1 and attempts >= failures
    assert failures <= 1 + int(elapsed // 30)  # at most one line per 30 s, however often it retried
