"""One typed configuration tree, loaded once in `main` and passed down frozen.

Every threshold carries the reason for its default. Unknown keys are errors; `load_config` reports every
problem it finds at once, not just the first.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import typing
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final, Literal
from urllib.parse import urlparse

import msgspec
import yaml
from msgspec import Meta, Struct

__all__ = [
    "TOKEN_ENV", "ActivityConfig", "Config", "ConfigError", "Hysteresis", "InfluxConfig", "IngestConfig", "MqttTls",
    "NatsConfig", "NatsTls", "Thresholds", "config_warnings", "load_config", "load_metrics_token", "parse_shard",
    "parse_version", "resolve_token",
]

log = logging.getLogger(__name__)

Positive = Annotated[float, Meta(gt=0)]
Count = Annotated[int, Meta(ge=1)]



# ---- values read while loading, kept here so config depends on nothing else in posfleet ----------------

_VERSION_RE: Final = re.compile(r"^v?(\d+(?:\.\d+){0,3})")


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """'3.2.10-rc1' -> (3, 2, 10); None when there is no leading dotted number."""
    if not text:
        return None
    m = _VERSION_RE.match(text.strip())
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def load_metrics_token(path: str | None) -> str | None:
    """The /metrics bearer token from `metrics.token_file` (first line), or None when not configured."""
    if not path:
        return None
    token = Path(path).read_text(encoding="utf-8").strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ValueError(f"{path}: the /metrics token must be one word of at least 16 characters")
    return token


TOKEN_ENV = "POSFLEET_INFLUX_TOKEN"


def parse_shard(text: str) -> tuple[int, int]:
    """'i/K' -> (i, K) with 0 <= i < K; ValueError with the reason otherwise."""
    left, sep, right = text.partition("/")
    if not sep or not left.strip().isdigit() or not right.strip().isdigit():
        raise ValueError(f"must look like i/K (e.g. 0/2), got {text!r}")
    i, k = int(left), int(right)
    if k < 1 or i >= k:
        raise ValueError(f"{text!r}: need 0 <= i < K")
    return i, k


class InfluxConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The `influx:` section of the collector configuration. The token is never here (see `resolve_token`)."""

    # history is optional: monitoring and alerting never depend on it
    enabled: bool = False
    # InfluxDB's own default port; VictoriaMetrics serves the same API on its port (8428)
    url: str = "http://127.0.0.1:8086"
    # InfluxDB 2/3 need an org; 1.8+ and VictoriaMetrics ignore it
    org: str = "posfleet"
    # InfluxDB 1.8+: "database/retention_policy"
    bucket: str = "posfleet"
    # file holding the token; the environment variable POSFLEET_INFLUX_TOKEN wins; empty = no token
    token_file: str = ""
    # InfluxData's recommended batch size (5,000 lines, ~1.5 MB of heartbeats)
    batch_size: int = 5000
    # a partial batch is sent after at most this long: bounds history latency and what a crash can lose
    flush_interval_s: float = 1.0
    # memory bound of unsent lines (~7 s of 25k heartbeats/s); beyond it data goes to the spool, then is dropped
    max_buffer_bytes: int = 64 * 1024 * 1024
    # a 5,000-line write takes tens of ms; 10 s means the server is in trouble (InfluxDB clients' default)
    request_timeout_s: float = 10.0
    # gzip costs CPU in the collector; worth it only over a slow link to the server
    gzip: bool = False
    # first retry after ~0.5 s: a restarting server is usually back within seconds
    backoff_initial_s: float = 0.5
    # cap between retries: recovery is noticed within 30 s without hammering a struggling server
    backoff_max_s: float = 30.0
    # spooled data is compressed ~10x: 2 GiB hold ~45 min of 25k heartbeats/s; size it for your longest outage
    spool_max_bytes: int = 2 * 1024 * 1024 * 1024
    # the unit of drop-oldest when the spool is full: small enough to lose little, large enough for few files
    spool_segment_bytes: int = 16 * 1024 * 1024
    # fsync each spooled batch: a power cut loses nothing acknowledged to the spool; a few fsyncs per second
    spool_fsync: bool = True
    # zlib level 1 on spooled batches only (outages), ~10x more outage per byte of disk
    spool_compress: bool = True
    # stays within systemd's (90 s) and Kubernetes' (30 s) stop grace periods; the rest is spooled
    shutdown_deadline_s: float = 10.0

    def __post_init__(self) -> None:
        problems = []
        if not self.url.startswith(("http://", "https://")):
            problems.append(f"url must start with http:// or https://, got {self.url!r}")
        if not self.bucket:
            problems.append("bucket must not be empty")
        for name in ("batch_size", "max_buffer_bytes", "spool_max_bytes", "spool_segment_bytes"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        for name in ("flush_interval_s", "request_timeout_s", "backoff_initial_s", "backoff_max_s",
                     "shutdown_deadline_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0")
        if self.spool_segment_bytes > self.spool_max_bytes:
            problems.append("spool_segment_bytes must not exceed spool_max_bytes")
        if self.backoff_max_s < self.backoff_initial_s:
            problems.append("backoff_max_s must be >= backoff_initial_s")
        if problems:
            raise ValueError("influx: " + "; ".join(problems))


def resolve_token(cfg: InfluxConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The API token: $POSFLEET_INFLUX_TOKEN, else the token file's content, else None (no auth)."""
    env = os.environ if environ is None else environ
    token = env.get(TOKEN_ENV, "").strip()
    if token:
        return token
    if cfg.token_file:
        token = Path(cfg.token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"influx: token file {cfg.token_file} is empty")
        return token
    return None


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem."""


class Hysteresis(Struct, frozen=True, forbid_unknown_fields=True):
    """Consecutive observations needed to raise and to clear a heartbeat-driven condition."""

    # Two heartbeats in a row: one corrupt or odd message never raises or clears a condition on its own,
    # while a real fault is named within two heartbeat intervals.
    raise_after: Count = 2
    clear_after: Count = 2


class Thresholds(Struct, frozen=True, forbid_unknown_fields=True):
    """Every threshold of every condition."""

    # offline: silent for this many of its own heartbeat intervals. Three tolerates one lost heartbeat and one
    # late one on a congested cellular link; fewer pages for normal jitter.
    offline_factor: Positive = 3.0
    # After a last will (connection lost), offline as soon as one interval (+ slack) passes without a heartbeat:
    # the will says the link broke, the missed heartbeat confirms it was not a stale will from an old session.
    will_confirm_factor: Positive = 1.0
    will_confirm_slack_s: Annotated[float, Meta(ge=0)] = 2.0
    # Interval assumed for a terminal that has never sent a heartbeat (firmware default).
    default_interval_s: Positive = 30.0
    # upload_backlog: a handful of queued transactions is normal between uploads; 20 is a busy shop's hour
    # that could not reach the host.
    backlog_queue_depth: Count = 20
    # ... or the oldest queued transaction waited this long (terminal clock): acquirers expect uploads within
    # minutes; ten minutes without an ack is what merchants notice as "payment missing".
    backlog_oldest_age_s: Positive = 600.0
    # upstream_missing: the host acknowledged uploads to the terminal, but its feed recorded none of this
    # terminal's transactions for this long. Feeds batch every few minutes; 15 minutes avoids paging on batching.
    upstream_grace_s: Positive = 900.0
    # upstream_feed_stale: an acquirer feed silent for this long is stale (maintenance or an outage); while
    # stale, upstream_missing is not evaluated for its terminals.
    feed_stale_s: Positive = 300.0
    # weak_signal: below -95 dBm (cellular/wifi) uploads start timing out; raise only when sustained.
    weak_signal_rssi_dbm: float = -95.0
    weak_signal: Hysteresis = Hysteresis(raise_after=3, clear_after=3)
    # clock_skew: TLS and host-side duplicate checks break beyond a few minutes; 300 s matches common
    # acquirer tolerance.
    clock_skew_s: Positive = 300.0
    # flapping: this many reboots or offline->online cycles within the window is a power or network fault, not
    # chance.
    flapping_events: Count = 3
    flapping_window_s: Positive = 3600.0
    # After the collector could not hear the broker for d seconds (broker down, link lost), terminals reconnect
    # with their own exponential backoff, whose last wait is at most about d (the waits double): silence is then
    # measured from min(d, this) after the collector hears again. 120 s is paho's and most embedded MQTT stacks'
    # longest backoff.
    reconnect_grace_s: Annotated[float, Meta(ge=0)] = 120.0
    # Everything else heartbeat-driven (hardware, backlog, registry, software, skew).
    default: Hysteresis = Hysteresis()
    # mass_offline (per site and per acquirer, a fleet-level condition): half of the terminals that should be
    # online (known minus cleanly shut down) are offline together. Below half, independent faults are plausible
    # and the per-terminal alerts say more; at half, one shared cause (power, uplink, broker) is the best bet.
    mass_offline_share: Annotated[float, Meta(gt=0, le=1)] = 0.5
    # ... and cleared only below this share, so an outage hovering around half does not raise and clear on every
    # terminal that comes back or drops again.
    mass_offline_clear_share: Annotated[float, Meta(ge=0, le=1)] = 0.4
    # ... and at least this many offline, so a site with two terminals does not page as a "mass" outage.
    mass_offline_min_terminals: Count = 3
    # Ticks in a row (eval_interval_s apart) the share must hold to raise and must stay below to clear: a burst of
    # reconnects or one tick taken mid-wave never raises or clears it on its own.
    mass_offline: Hysteresis = Hysteresis(raise_after=2, clear_after=2)


class MqttTls(Struct, frozen=True, forbid_unknown_fields=True):
    """TLS for an `mqtts://` broker: a private CA and/or a client certificate (PEM files)."""

    # Unset: the system's trust store, which is right for a broker with a public certificate.
    ca_file: str | None = None
    # Both or neither: a broker that requires client certificates (`require_certificate true`).
    cert_file: str | None = None
    key_file: str | None = None


class MqttConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """Broker connection and topics."""

    url: str = "mqtt://127.0.0.1:1883"
    # A fixed client id + clean_session=False makes the broker queue QoS 1 messages while we restart.
    client_id: str = "posfleet-collector"
    topic_prefix: str = "pos/v1"
    upstream_prefix: str = "acquirer/v1"
    username: str | None = None
    password_file: str | None = None  # never on the command line; POSFLEET_MQTT_PASSWORD also works
    keepalive_s: Annotated[int, Meta(ge=5)] = 30
    reconnect_min_s: Annotated[int, Meta(ge=1)] = 1  # paho takes whole seconds
    reconnect_max_s: Annotated[int, Meta(ge=1)] = 30
    # Messages received and not yet applied. When full, the socket is no longer read and the broker holds the
    # rest (backpressure instead of unbounded memory).
    queue_size: Count = 10_000  # ~0.4 s of a 25k/s stream; ~4 MB of payloads at most
    tls: MqttTls | None = None  # only with mqtts:// (which without it verifies against the system's CAs)


class IngestConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """Where messages come from."""

    # mqtt: one broker (Mosquitto, the demo's embedded one), the simple deployment. nats: partitions of a NATS
    # JetStream stream fed by the servers' MQTT gateway, for several collectors (docs/scale.md).
    source: Literal["mqtt", "nats"] = "mqtt"


class NatsTls(Struct, frozen=True, forbid_unknown_fields=True):
    """TLS towards the NATS servers (PEM files); with `tls://` server URLs."""

    ca_file: str | None = None  # unset: the system's trust store
    cert_file: str | None = None  # both or neither: servers that verify client certificates
    key_file: str | None = None


class NatsConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """The `nats:` section, read only with `ingest.source: nats` (collector/cluster, collector/ingest/nats.py)."""

    # Any of the cluster's servers: the client learns the others from the first it reaches.
    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    user: str | None = None
    password_file: str | None = None  # never on the command line; POSFLEET_NATS_PASSWORD also works
    token_file: str | None = None
    creds_file: str | None = None  # a decentralised-auth .creds file (JWT + nkey seed)
    tls: NatsTls | None = None
    # The stream holding the terminals' messages, partitioned by the servers' subject mapping
    # `pos.v1.*.*` -> `<subject_prefix>.{{partition(N,1)}}.{{wildcard(1)}}.{{wildcard(2)}}` (deploy/nats/).
    stream: str = "POSP"
    subject_prefix: str = "posp"
    # The acquirer feeds (`acquirer.v1.>`, unpartitioned): every collector reads all of it.
    feed_stream: str = "FEED"
    # Fixed for the life of the stream, and larger than any number of collectors you expect: 64 gives 2..32
    # collectors shares within one partition of each other. Must equal N in the servers' mapping.
    partitions: Annotated[int, Meta(ge=1, le=4096)] = 64
    # This collector's name among the others (leases, consumer of the acquirer feed); default: the host name.
    instance: str = ""
    # lease: partitions are shared out among the running collectors and taken over when one dies. static:
    # exactly the partitions of `shard` (every K-th from i), nobody takes them over.
    ownership: Literal["lease", "static"] = "lease"
    # "i/K": this collector's preferred (lease) or only (static) share of the partitions.
    shard: str | None = None
    # A dead collector's partitions are taken over this long after its last renewal (renewed every third of
    # it): 6 s keeps a takeover within 15 s with room for a busy loop and the server's expiry timer.
    lease_ttl_s: Annotated[float, Meta(ge=2)] = 6.0
    lease_bucket: str = "posfleet_leases"
    # Per partition the state of its terminals and the last applied stream sequence (object store).
    state_bucket: str = "posfleet_state"
    # Replicas of the stream and buckets the collector creates when they are missing: 3 in a 3-node cluster
    # (a node can die without losing data); 1 is for a single test server.
    replicas: Annotated[int, Meta(ge=1, le=5)] = 1
    # Limits retention: what a collector can replay after an outage. 24 h covers a night without collectors.
    stream_max_age_s: Positive = 86400.0
    stream_max_bytes: int = -1  # -1: no byte limit besides the servers' own
    # Messages fetched per partition and request; the consumer lets 20x that be unacknowledged, so a fetch
    # never waits for an acknowledgement of the one before (FIELD-NOTES: 504 msg/s vs 30k msg/s).
    fetch_batch: Annotated[int, Meta(ge=1, le=10_000)] = 500
    max_ack_pending: Annotated[int, Meta(ge=1)] = 20_000
    # JetStream API requests wait this long: the client's 5 s default is too short on two busy cores.
    api_timeout_s: Positive = 20.0


class HttpConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """HTTP API and /metrics."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 9108
    # File with one `token scope[,scope...]` per line; scopes: `read:<acquirer>`, `read:*`,
    # `write:upstream:<acquirer>` and `write:upstream` (every acquirer); see collector/http/auth.py.
    tokens_file: str | None = None


class RegistryConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """Registry of known terminals."""

    path: str | None = None  # CSV: terminal_id,merchant_id,acquirer,model,site,region
    reload_interval_s: Positive = 30.0  # the file's mtime is checked this often; SIGHUP reloads at once


class StateConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """Persistence of per-terminal state."""

    snapshot_path: str | None = "var/state.snapshot"
    # Durable spool of history the database could not take yet (see influx.spool_max_bytes).
    spool_dir: str = "var/influx-spool"
    # A crash loses at most this much state change; at 100k terminals a snapshot takes well under a second.
    snapshot_interval_s: Positive = 60.0
    # Time-driven conditions (offline, upstream_missing) are evaluated this often.
    eval_interval_s: Positive = 2.0


class MetricsConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """Prometheus exposition."""

    # 5,000 problem series render in ~50 ms; a whole-fleet outage is told by the aggregates, not 100k series.
    max_problem_series: Count = 5000
    # /metrics names the problem terminals of every acquirer, with no token. Setting `port` serves it ONLY on
    # its own listener (`host`, default http.host), which a firewall or network can keep to Prometheus; the
    # API listener then answers 404 for /metrics. Unset (default): served on the API listener as before, so
    # existing scrape configs and single-listener setups keep working; bind http.host to a trusted network.
    host: str | None = None
    port: Annotated[int, Meta(ge=0, le=65535)] | None = None
    # Optionally also a bearer token (one line, 16+ characters) that every /metrics request must carry, on
    # whichever listener serves it; Prometheus sends it with `authorization: {credentials_file: ...}`.
    token_file: str | None = None


def _zone_problem(name: str) -> str | None:
    """Why `name` is not an IANA time zone this host knows, or None."""
    try:
        zoneinfo.ZoneInfo(name)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        return f"unknown time zone {name!r} (an IANA name such as Europe/Berlin)"
    return None


class ActivityConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """Learned activity baselines (`activity_drop`, `acquirer_volume_drop`): the model's knobs, whose reasons are
    in docs/activity.md (Parameters), the zones a terminal's local hours are read in, and a holiday calendar."""

    enabled: bool = True
    # A terminal's zone: the registry's `tz` column, else its acquirer's entry here, else `default_tz`.
    default_tz: str = "UTC"
    acquirer_tz: dict[str, str] = {}
    # Public holidays: registry region (or "*" for every region) -> local dates (YYYY-MM-DD). Those local days
    # count for nothing: no expectation, no flag (an acquirer-wide holiday is otherwise one warning per shop).
    holidays: dict[str, list[str]] = {}
    # A silent terminal's flag time is computed ahead (flag_due) and recomputed at least this often, so a
    # baseline that changed or a first sale that moved the stretch is seen within this long.
    recheck_s: Positive = 900.0
    half_life_days: Positive = 7.0  # a changed shop relearned in ~2 weeks, one odd day moves a bucket <= 13%
    fast_half_life_days: Positive = 2.0  # improbable zeros (a shop now closed then) relearned in ~4 days
    min_cover_s: Annotated[int, Meta(ge=1, le=3600)] = 1800  # an hour heard for less than half teaches nothing
    max_gap_s: Positive = 600.0  # a delta is spread only over a normal heartbeat gap (<= 10 x 60 s)
    min_learned_h: Count = 168  # one week: every hour of every day type seen before judging
    p_stretch: Annotated[float, Meta(gt=0, lt=1)] = 1e-3  # the P(no sale) < 1/1000, a floor
    p_day: Annotated[float, Meta(gt=0, lt=1)] = 1e-5  # false flags per terminal-day near 1e-5 (target 1e-4)
    opening_slack_h: Annotated[float, Meta(ge=0)] = 0.5  # shops open up to ~30 min late
    horizon_h: Count = 336  # a stretch is integrated over at most 14 days (bounded work)
    # Regional holiday guard: a local day on which at least this share of a region's online terminals that
    # normally have sold by now have not (over at least holiday_min_peers of them) counts for nothing: faults are
    # independent per terminal, a whole region silent together is a calendar. Fewer peers prove nothing.
    holiday_share: Annotated[float, Meta(gt=0, le=1)] = 0.5
    holiday_min_peers: Count = 20
    # One pass over the fleet for that share takes this long (a share of the terminals per tick): a holiday is
    # found within ~2 passes of enough peers passing their usual first sale, before busy shops would be flagged.
    holiday_scan_s: Positive = 600.0
    volume_windows_s: tuple[Annotated[int, Meta(ge=60, le=3600)], ...] = (600, 1800)  # 10 min big, 30 min small
    volume_ratio: Annotated[float, Meta(gt=0, lt=1)] = 0.6  # "far below", with room for daily swings
    volume_p: Annotated[float, Meta(gt=0, lt=1)] = 1e-6  # <= 3e-3 false flags per acquirer-day
    volume_min_expected: Positive = 200.0  # a halving is then >= 100 short (~7 sd)
    volume_slack_s: Annotated[float, Meta(ge=0)] = 120.0  # batches a minute or two late are not a drop
    volume_ramp_s: Annotated[float, Meta(ge=0, le=3600)] = 1200.0  # shops open up to ~20 min late

    def __post_init__(self) -> None:
        problems = [f"default_tz: {why}" for why in [_zone_problem(self.default_tz)] if why]
        problems += [f"acquirer_tz.{a}: {why}" for a, z in self.acquirer_tz.items() if (why := _zone_problem(z))]
        for region, days in self.holidays.items():
            for day in days:
                try:
                    datetime.date.fromisoformat(day)
                except ValueError:
                    problems.append(f"holidays.{region}: {day!r} is not a date (YYYY-MM-DD)")
        if problems:
            raise ValueError("activity: " + "; ".join(problems))


class Config(Struct, frozen=True, forbid_unknown_fields=True):
    """The whole configuration."""

    mqtt: MqttConfig = MqttConfig()
    ingest: IngestConfig = IngestConfig()
    nats: NatsConfig = NatsConfig()  # only with ingest.source: nats
    http: HttpConfig = HttpConfig()
    registry: RegistryConfig = RegistryConfig()
    state: StateConfig = StateConfig()
    thresholds: Thresholds = Thresholds()
    metrics: MetricsConfig = MetricsConfig()
    # Minimum app version per terminal model, e.g. {"A920": "3.2.0"}; "*" applies to models not listed.
    software_policy: dict[str, str] = {}
    influx: InfluxConfig = InfluxConfig()  # history writer; off unless influx.enabled
    activity: ActivityConfig = ActivityConfig()  # learned activity baselines (docs/activity.md)


def _unreadable(path: str) -> str | None:
    """Why a file cannot be read, or None."""
    if not os.path.isfile(path):
        return f"no such file {path!r}"
    if not os.access(path, os.R_OK):
        return f"cannot read {path!r}"
    return None


def _tls_problems(cfg: MqttConfig) -> list[str]:
    tls = cfg.tls
    if tls is None:
        return []
    problems = []
    if not cfg.url.startswith("mqtts://"):
        problems.append("mqtt.tls: needs an mqtts:// url (mqtt:// is plain TCP)")
    if (tls.cert_file is None) != (tls.key_file is None):
        problems.append("mqtt.tls: cert_file and key_file go together (a client certificate needs its key)")
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, key)
        why = _unreadable(path) if path is not None else None
        if why:
            problems.append(f"mqtt.tls.{key}: {why}")
    return problems


_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _nats_problems(cfg: NatsConfig) -> list[str]:
    """What is wrong in the `nats:` section (checked only when it is used)."""
    problems = []
    if not cfg.servers:
        problems.append("nats.servers: name at least one server")
    for url in cfg.servers:
        if not url.startswith(("nats://", "tls://")):
            problems.append(f"nats.servers: {url!r} must start with nats:// or tls://")
    for key in ("stream", "feed_stream", "subject_prefix", "lease_bucket", "state_bucket"):
        if not _NAME_RE.match(getattr(cfg, key)):
            problems.append(f"nats.{key}: must match [A-Za-z0-9_-]{{1,64}}")
    if cfg.instance and not _NAME_RE.match(cfg.instance):
        problems.append("nats.instance: must match [A-Za-z0-9_-]{1,64}")
    if cfg.shard is not None:
        try:
            _i, k = parse_shard(cfg.shard)
            if k > cfg.partitions:
                problems.append(f"nats.shard: {k} shards need at least as many partitions ({cfg.partitions})")
        except ValueError as err:
            problems.append(f"nats.shard: {err}")
    elif cfg.ownership == "static":
        problems.append("nats.shard: static ownership needs a shard (i/K)")
    if cfg.max_ack_pending < 2 * cfg.fetch_batch:
        problems.append("nats.max_ack_pending: must be at least twice nats.fetch_batch")
    if cfg.user is None and cfg.password_file:
        problems.append("nats.password_file: needs nats.user")
    if sum(x is not None for x in (cfg.user, cfg.token_file, cfg.creds_file)) > 1:
        problems.append("nats: user/password, token_file and creds_file exclude each other")
    files = [("password_file", cfg.password_file), ("token_file", cfg.token_file), ("creds_file", cfg.creds_file)]
    if cfg.tls is not None:
        if (cfg.tls.cert_file is None) != (cfg.tls.key_file is None):
            problems.append("nats.tls: cert_file and key_file go together")
        files += [(f"tls.{k}", getattr(cfg.tls, k)) for k in ("ca_file", "cert_file", "key_file")]
    for key, path in files:
        why = _unreadable(path) if path else None
        if why:
            problems.append(f"nats.{key}: {why}")
    return problems


def _semantic_problems(cfg: Config) -> list[str]:
    problems = []
    if cfg.ingest.source == "nats":
        problems += _nats_problems(cfg.nats)
    if not cfg.mqtt.url.startswith(("mqtt://", "mqtts://")):
        problems.append(f"mqtt.url: must start with mqtt:// or mqtts://, got {cfg.mqtt.url!r}")
    problems += _tls_problems(cfg.mqtt)
    if cfg.metrics.token_file:
        try:
            load_metrics_token(cfg.metrics.token_file)
        except OSError as err:
            problems.append(f"metrics.token_file: cannot read {cfg.metrics.token_file!r}: {err.strerror}")
        except ValueError as err:
            problems.append(f"metrics.token_file: {err}")
    if cfg.metrics.host is not None and cfg.metrics.port is None:
        problems.append("metrics.host: needs metrics.port (without a port /metrics stays on the API listener)")
    if (cfg.metrics.port and cfg.metrics.port == cfg.http.port
            and (cfg.metrics.host or cfg.http.host) == cfg.http.host):
        problems.append("metrics.port: must differ from http.port on the same host")
    if cfg.mqtt.reconnect_min_s > cfg.mqtt.reconnect_max_s:
        problems.append("mqtt.reconnect_min_s: must not exceed mqtt.reconnect_max_s")
    if cfg.thresholds.will_confirm_factor > cfg.thresholds.offline_factor:
        problems.append("thresholds.will_confirm_factor: must not exceed offline_factor")
    if cfg.registry.path and not Path(cfg.registry.path).is_file():
        problems.append(f"registry.path: no such file {cfg.registry.path!r}")
    if cfg.mqtt.password_file and not os.access(cfg.mqtt.password_file, os.R_OK):
        problems.append(f"mqtt.password_file: cannot read {cfg.mqtt.password_file!r}")
    if cfg.influx.enabled:
        try:
            resolve_token(cfg.influx)
        except (OSError, ValueError) as err:
            problems.append(f"influx.token_file: {getattr(err, 'strerror', None) or err}")
    for model, version in cfg.software_policy.items():
        if parse_version(version) is None:
            problems.append(f"software_policy.{model}: {version!r} is not a dotted version like 3.2.0")
    return problems


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_warnings(cfg: Config, env: dict[str, str] | None = None) -> list[str]:
    """What is valid but unsafe: a broker password sent in clear text over the network."""
    env = dict(os.environ) if env is None else env
    warnings = []
    url = urlparse(cfg.mqtt.url)
    has_password = bool(cfg.mqtt.password_file or env.get("POSFLEET_MQTT_PASSWORD"))
    # On loopback the password never crosses a network; anywhere else anyone on the path can read it.
    if url.scheme == "mqtt" and cfg.mqtt.username and has_password and not _loopback(url.hostname or ""):
        warnings.append(
            f"mqtt: username and password are sent in clear text over {cfg.mqtt.url}; use mqtts:// "
            "(mqtt.tls for a private CA or client certificate)"
        )
    return warnings


def _struct_type(t: object, value: object) -> type[Struct] | None:
    """The Struct a field holds (also inside `X | None`), when the value is a mapping to check field by field."""
    if not isinstance(value, dict):
        return None
    candidates = [t, *typing.get_args(t)]
    found = [c for c in candidates if isinstance(c, type) and issubclass(c, Struct)]
    return found[0] if len(found) == 1 else None


def _structural_problems(raw: object, typ: type[Struct], where: str = "") -> list[str]:
    """Every problem msgspec would find in `raw` as `typ`, field by field (msgspec itself stops at the first)."""
    if not isinstance(raw, dict):
        return [f"{where.rstrip('.') or 'the configuration'}: expected a mapping, got {type(raw).__name__}"]
    fields = {f.encode_name: f for f in msgspec.structs.fields(typ)}
    problems = [f"{where}{key}: unknown key" for key in raw if key not in fields]
    for name, f in fields.items():
        if name not in raw:
            continue
        value, nested = raw[name], _struct_type(f.type, raw[name])
        if nested is not None:
            inner = _structural_problems(value, nested, f"{where}{name}.")
            problems += inner
            if inner:
                continue  # the whole section's own checks (__post_init__) only make sense once its fields do
        try:
            msgspec.convert(value, f.type, strict=False)
        except msgspec.ValidationError as err:
            text = str(err)  # a section's own check already names the section
            problems.append(text if text.startswith(f"{name}: ") else f"{where}{name}: {text}")
    return problems


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load and validate the YAML file (or defaults when path is None)."""
    raw: object = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as err:
            raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    structural = _structural_problems(raw, Config)
    if structural:  # every unknown key and every ill-typed or out-of-range value, not just the first
        raise ConfigError(f"{path}: " + "; ".join(structural))
    try:
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as err:  # what the per-field pass cannot see (none known); kept as a net
        raise ConfigError(f"{path}: {err}") from None
    problems = _semantic_problems(cfg)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    # Logged, not raised: `posfleet run` and `posfleet check-config` both show it (at WARNING) and still start.
    for warning in config_warnings(cfg):
        log.warning("%s", warning)
    return cfg
