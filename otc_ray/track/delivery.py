"""Tracking calls that survive a tracking-server outage: sent in order from a background thread, kept and retried
while the server is away, so that training never waits on, or dies with, the server.

    send = Delivery("run 3f2a")
    send.submit("metrics step 40", lambda: client.log_batch(run_id, metrics=batch))
    ...
    undelivered = send.close(timeout_s=600)     # waits for the server to come back, up to timeout_s

A call that fails is retried (backoff `retry_s`, doubling up to 30 s) until it succeeds; the calls behind it wait, so
the order is kept. The first failure prints one line (the server is unreachable, calls are buffered); the first
success after it prints another (back, how many were delivered late). A call the server refuses as a bad request
(an error code of REFUSED_CODES) is dropped with a printed line: retrying cannot fix it. Nothing is dropped silently:
`close` returns the descriptions of the calls still undelivered at its deadline.
"""
from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Callable

# MLflow error codes that mean "this request is wrong", not "the server is away"
REFUSED_CODES = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST",
                           "RESOURCE_ALREADY_EXISTS", "INVALID_STATE", "MALFORMED_REQUEST"})
MAX_BACKOFF_S = 30.0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Delivery:
    """One background sender of tracking calls (see module docstring); `name` prefixes its messages."""

    def __init__(self, name: str, retry_s: float = 2.0):
        self.name, self.retry_s = name, retry_s
        self._queue: collections.deque[tuple[str, Callable[[], object]]] = collections.deque()
        self._cond = threading.Condition()
        self._busy, self._closing = False, False
        self.failed_since: float | None = None
        self._failures = 0                          # consecutive failed attempts (backoff)
        self._thread = threading.Thread(target=self._run, name=f"tracking-delivery-{name}", daemon=True)
        self._thread.start()

    def submit(self, what: str, call: Callable[[], object]) -> None:
        """Queue `call` (described by `what` in messages); returns at once."""
        with self._cond:
            self._queue.append((what, call))
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._busy

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued call is delivered (True) or `timeout_s` passes (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def close(self, timeout_s: float, say_left: bool = True) -> list[str]:
        """`flush`, then stop the sender; returns what is still undelivered (printed too unless not `say_left`), []
        when all went."""
        self.flush(timeout_s)
        with self._cond:
            self._closing = True
            left = [what for what, _ in self._queue]
            self._queue.clear()
            self._cond.notify_all()
        if left and say_left:
            _say(f"[{self.name}] tracking server unreachable for {timeout_s:.0f} s at the end: {len(left)} calls not "
                 f"delivered ({', '.join(left[:5])}{' ...' if len(left) > 5 else ''})")
        return left

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                what, call = self._queue[0]
                self._busy = True
            delivered = self._attempt(what, call)
            with self._cond:
                self._busy = False
                if delivered and self._queue and self._queue[0][1] is call:
                    self._queue.popleft()
                self._cond.notify_all()
            if not delivered:
                backoff = min(self.retry_s * 2 ** min(self._failures - 1, 5), MAX_BACKOFF_S)
                with self._cond:
                    self._cond.wait_for(lambda: self._closing, timeout=backoff)

    def _attempt(self, what: str, call: Callable[[], object]) -> bool:
        """True when the call went through (or was refused for good); False to retry it later."""
        try:
            call()
        except Exception as e:                      # noqa: BLE001 - any failure: buffered, retried, reported
            code = str(getattr(e, "error_code", ""))
            if code in REFUSED_CODES:
                _say(f"[{self.name}] tracking server refused {what} ({code}): {str(e)[:200]}")
                return True
            self._failures += 1
            if self.failed_since is None:
                self.failed_since = time.monotonic()
                _say(f"[{self.name}] tracking server unreachable ({type(e).__name__}: {str(e)[:160]}); training goes "
                     f"on, tracking calls are buffered and retried")
            return False
        self._failures = 0
        if self.failed_since is not None:
            _say(f"[{self.name}] tracking server back after {time.monotonic() - self.failed_since:.0f} s; "
                 f"delivering the buffered calls")
            self.failed_since = None
        return True
