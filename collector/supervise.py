"""Supervised background tasks: a task that dies is logged, counted, restarted with backoff, and makes the
collector not ready until it makes progress again; too many deaths in a window stop the collector.

A bare `create_task` whose coroutine raises dies silently: the evaluation tick stops and offline detection with
it, while /readyz still says ready. Here every death is loud (traceback, `posfleet_task_restarts_total{task}`,
a readiness problem naming the task) and a task that cannot stay up ends the process with a non-zero exit, so
systemd or the orchestrator restarts it and PosCollectorDown tells on-call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

__all__ = ["DEFAULT_POLICY", "RestartPolicy", "Supervisor", "backoff_delay"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How a dead task is restarted, and when to give up."""

    # 1 s first: a transient fault (a file briefly missing) clears at once; doubling to 30 s keeps a task that
    # dies on every round from filling the log.
    backoff_min_s: float = 1.0
    backoff_max_s: float = 30.0
    # 5 deaths in 5 minutes is not transient: a restart of the whole process (fresh state from the snapshot,
    # and a PosCollectorDown page if it keeps failing) is the better remedy than limping on.
    max_failures: int = 5
    window_s: float = 300.0


def backoff_delay(policy: RestartPolicy, failures: int) -> float:
    """Seconds to wait before restarting after the `failures`-th recent failure (1-based)."""
    return float(min(policy.backoff_max_s, policy.backoff_min_s * 2 ** max(0, failures - 1)))


DEFAULT_POLICY = RestartPolicy()
TaskFactory = Callable[[], Coroutine[Any, Any, None]]


class Supervisor:
    """Runs named background tasks under a restart policy."""

    def __init__(
        self,
        restarts: Counter,
        on_fatal: Callable[[str], None],
        policy: RestartPolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.restarts, self.on_fatal, self.policy, self.clock = restarts, on_fatal, policy, clock
        self.failing: dict[str, str] = {}  # task -> why it is not healthy (cleared by progress)
        self.fatal: str | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, factory: TaskFactory) -> None:
        """Run `factory()` as the task `name`, restarting it when it dies with an exception."""
        self.restarts.labels(name)
        self._tasks[name] = asyncio.create_task(self._run(name, factory), name=f"posfleet:{name}")

    def progress(self, name: str) -> None:
        """The task completed a round: it is healthy again (clears its readiness problem)."""
        if self.failing and name in self.failing:
            del self.failing[name]
            log.info("background task %s is working again", name)

    def problems(self) -> list[str]:
        """Readiness problems: one per task that died and has not made progress since."""
        return [self.failing[name] for name in sorted(self.failing)]

    async def _run(self, name: str, factory: TaskFactory) -> None:
        recent: deque[float] = deque()
        while True:
            try:
                await factory()
                return  # a task that has nothing to do (e.g. no registry file configured) may end
            except asyncio.CancelledError:
                raise
            except Exception as err:
                now = self.clock()
                recent.append(now)
                while recent and now - recent[0] > self.policy.window_s:
                    recent.popleft()
                self.restarts.labels(name).inc()
                # Only the exception's type: /readyz is unauthenticated and a message may quote data (the log
                # has the full traceback).
                self.failing[name] = f"background task {name} died ({type(err).__name__}); restarting"
                if len(recent) >= self.policy.max_failures:
                    self.fatal = (
                        f"background task {name} died {len(recent)} times within {self.policy.window_s:g}s"
                    )
                    self.failing[name] = self.fatal
                    log.critical("%s; stopping the collector", self.fatal, exc_info=err)
                    self.on_fatal(name)
                    return
                delay = backoff_delay(self.policy, len(recent))
                log.error("background task %s died; restarting in %.3gs", name, delay, exc_info=err)
                await asyncio.sleep(delay)

    async def aclose(self) -> None:
        """Cancel every task and wait for it: a clean shutdown, nothing left pending."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
