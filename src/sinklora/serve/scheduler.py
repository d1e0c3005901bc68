"""Requests in flight: one worker thread runs them one after another on one model instance (a model
generates with one KV cache at a time), from a bounded waiting line.

A :class:`Job` crosses threads in both directions: the event loop submits it and reads its events
(``await job.next_event()``), the worker runs it and posts events (``job.post``), and either side may
cancel it (a client's disconnect, the time limit); the worker checks ``job.should_stop()`` between two
forward steps. A full line is refused at once (:class:`QueueFull`, HTTP 429 with Retry-After), never queued.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting line is full; ``retry_after`` is a guess in seconds (mean request time x requests ahead)."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are already waiting for the model; retry in about {retry_after} s")
        self.retry_after = retry_after


class Job:
    """One request: what to run (``payload``), its deadline, its cancellation, and its events for the loop."""

    def __init__(self, payload: Any, loop: asyncio.AbstractEventLoop, timeout: float):
        self.payload, self.loop = payload, loop
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout
        self.started: float | None = None
        self.reason: str | None = None  # why it was stopped early: "disconnected", "timeout", "shutdown"
        self.finish_reason: str | None = None  # set by the run function
        self.progress: Callable[[], dict[str, Any]] = dict  # set by the run function: where it is (for /health)
        self._stop = threading.Event()
        self._events: asyncio.Queue = asyncio.Queue()

    def cancel(self, reason: str) -> None:
        if not self._stop.is_set():
            self.reason = reason
            self._stop.set()

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def should_stop(self) -> bool:
        """Checked by the worker between steps: cancelled, or past the deadline (then cancelled as "timeout")."""
        if not self._stop.is_set() and time.monotonic() > self.deadline:
            self.cancel("timeout")
        return self._stop.is_set()

    def post(self, kind: str, value: Any = None) -> None:
        """From the worker thread: hand ``(kind, value)`` to the event loop (dropped if the loop has closed)."""
        try:
            self.loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:
            logger.debug("event loop closed; dropped a %s event", kind)

    async def next_event(self) -> tuple[str, Any]:
        """The next ``(kind, value)``; at the deadline, cancels the job and returns ``("timeout", None)``."""
        try:
            return await asyncio.wait_for(self._events.get(), timeout=max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            self.cancel("timeout")
            return "timeout", None


class Scheduler:
    """A worker thread that runs ``run(job)`` for one job at a time; at most ``max_queue`` jobs wait."""

    def __init__(self, run: Callable[[Job], None], max_queue: int):
        self._run, self.max_queue = run, max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.running: Job | None = None
        self.counts: collections.Counter[str] = collections.Counter()
        self._mean_s = 1.0  # running mean of request time, for Retry-After
        self._thread = threading.Thread(target=self._work, name="sinklora-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``, or raise :class:`QueueFull` when ``max_queue`` jobs already wait behind a running one."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            for stale in [j for j in self._waiting if j.cancelled]:
                self._waiting.remove(stale)
            if len(self._waiting) >= self.max_queue and (self.running is not None or self._waiting):
                self.counts["rejected"] += 1
                ahead = len(self._waiting) + 1
                raise QueueFull(len(self._waiting), max(1, math.ceil(self._mean_s * ahead)))
            self._waiting.append(job)
            self._cond.notify()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            running = self.running
            return {"running": None if running is None else running.progress(),
                    "waiting": sum(not j.cancelled for j in self._waiting), "max_queue": self.max_queue,
                    "finished": dict(self.counts)}

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                job = self.running = self._waiting.popleft()
            try:
                if not job.should_stop():  # cancelled or timed out while waiting
                    job.started = time.monotonic()
                    self._run(job)
                    self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - job.started)
            except Exception as e:  # reported to the request; the worker lives on
                logger.exception("request failed")
                job.post("error", e)
            finally:
                with self._cond:
                    self.running = None
                    self.counts[job.reason or job.finish_reason or "error"] += 1
                job.post("end")

    def close(self, timeout: float = 30.0) -> None:
        """Cancel every job (waiting and running) and stop the worker."""
        with self._cond:
            self._closed = True
            for job in [*self._waiting, *([self.running] if self.running else [])]:
                job.cancel("shutdown")
            self._cond.notify_all()
        self._thread.join(timeout)
