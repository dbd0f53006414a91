"""The sinks the composition root feeds: one typed signature each, whoever listens (ledger, history writer)."""

from __future__ import annotations

from typing import Protocol

from collector.fleet.protocol import Message
from collector.fleet.state import Terminal, Transition

__all__ = ["MessageSink", "TransitionSink"]


class MessageSink(Protocol):
    """Called once per applied message with its receive time and the terminal it belongs to (None for an
    acquirer's upstream batch and for ids outside the fleet)."""

    def __call__(self, msg: Message, rx: float, terminal: Terminal | None, /) -> None: ...


class TransitionSink(Protocol):
    """Called with the conditions raised or cleared by one message or one evaluation pass."""

    def __call__(self, out: list[Transition], /) -> None: ...
