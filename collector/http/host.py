"""What the HTTP routes need from the running collector: a narrow, typed view, so handlers never import the
composition root (collector.app provides it; tests can provide a smaller one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

from collector.config import Config
from collector.fleet.protocol import DecodeError, UpstreamBatch
from collector.fleet.state import Fleet, UpstreamResult
from collector.http.auth import Tokens
from collector.http.metrics import FleetCollector

__all__ = ["ApiHost", "RouteHook"]

RouteHook = Callable[[web.Application], None]


class ApiHost(Protocol):
    """The collector as the HTTP API sees it."""

    @property
    def cfg(self) -> Config: ...
    @property
    def fleet(self) -> Fleet: ...
    @property
    def tokens(self) -> Tokens: ...
    @property
    def prom_registry(self) -> CollectorRegistry: ...
    @property
    def fleet_collector(self) -> FleetCollector: ...
    @property
    def route_hooks(self) -> list[RouteHook]: ...

    def readiness_problems(self) -> list[str]:
        """Why the collector is not ready (empty when it is)."""
        ...

    def count_reject(self, kind: str, err: DecodeError) -> None:
        """Count (and rate-limit log) one rejected message."""
        ...

    def apply_upstream(self, batch: UpstreamBatch, rx: float) -> UpstreamResult:
        """Apply an acquirer's upstream batch received over HTTP."""
        ...
