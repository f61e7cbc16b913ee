"""Several servers behind one client: requests go to the least-loaded server, a server that fails is skipped (its
request goes to the others) and tried again after a back-off, and when every server has failed for ``give_up_after``
seconds the call raises :class:`ServersDown`, one sentence naming the servers and the last error. Used by
:class:`~divrl.rewards.RemoteReward` and the Mind-the-Glitch client. Plain Python (threads): no server code.

A failure is *retryable* (the ``send`` function raises :class:`Retryable`: no connection, a timeout, HTTP 5xx or
429) or not (any other exception, e.g. a request the server refuses as malformed: every server would refuse it, so
it propagates at once). A failure is never a score.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["EndpointPool", "Retryable", "ServersDown"]

log = logging.getLogger("divrl.rewards.endpoints")

T = TypeVar("T")


class Retryable(Exception):
    """A failure worth sending the request again, to this server later or to another now."""


class ServersDown(RuntimeError):
    """Every server failed for ``give_up_after`` seconds: the run cannot be scored and stops.

    Attributes:
        urls: the servers.
        last_error: the last failure, as text.
    """

    def __init__(self, message: str, urls: Sequence[str], last_error: str):
        super().__init__(message)
        self.urls = list(urls)
        self.last_error = last_error


@dataclass
class _Server:
    url: str
    in_flight: int = 0
    failures: int = 0  # consecutive failed requests
    failed_at: float = -1.0  # monotonic time of the last failure
    retry_at: float = 0.0  # monotonic time it is tried again
    down_since: float | None = None  # wall-clock time of the first failure of the current outage
    last_error: str = ""
    outages: list = field(default_factory=list)  # (failed at, back at or None) wall-clock times


class EndpointPool:
    """Spread requests over ``urls`` by load, with failover and back-off.

    Args:
        urls: the servers, tried in order among equally loaded ones.
        give_up_after: seconds every server may fail (counted from the start of the request whose failure left none
            up) before :meth:`request` raises :class:`ServersDown`.
        backoff: seconds a failed server waits before it is tried again; doubled after each further failure (at least
            10 ms: no busy loop).
        max_backoff: the longest wait.
        what: how the logs and errors name a server ("reward server").
        hint: what the :class:`ServersDown` sentence tells the user to do.
    """

    def __init__(
        self,
        urls: Sequence[str],
        give_up_after: float,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        what: str = "reward server",
        hint: str = "",
    ):
        if not urls:
            raise ValueError(f"no {what} URL given; give at least one")
        if len(set(urls)) != len(urls):
            raise ValueError(f"{what} URLs {list(urls)} name a server twice; give each once")
        self.servers = [_Server(url) for url in urls]
        self.give_up_after = float(give_up_after)
        self.backoff = max(float(backoff), 0.01)
        self.max_backoff = float(max_backoff)
        self.what = what
        self.hint = hint
        self._all_down_since: float | None = None
        self._last_failure = ("", "")  # (url, error) of the latest failure
        self._turn = 0
        self._clock: Callable[[], float] = time.monotonic
        self._wall: Callable[[], float] = time.time
        self._lock = threading.Condition()

    def __getstate__(self) -> dict:  # a pool can be deep-copied or pickled with its reward; locks cannot
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Condition()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def request(self, send: Callable[[str], T]) -> T:
        """``send(url)`` on the least-loaded server that is up, again on the others after a :class:`Retryable`
        failure (waiting for a server's back-off when none is up), until it succeeds or every server has failed for
        ``give_up_after`` seconds (:class:`ServersDown`). Any other exception propagates."""
        while True:
            server = self._acquire()
            started = self._clock()
            try:
                result = send(server.url)
            except Retryable as err:
                self._failed(server, err, started)
                continue
            except BaseException:
                with self._lock:
                    server.in_flight -= 1
                    self._lock.notify_all()
                raise
            self._succeeded(server)
            return result

    # ------------------------------------------------------------------------------------------------ bookkeeping

    def _acquire(self) -> _Server:
        with self._lock:
            while True:
                now = self._clock()
                if self._all_down_since is not None and now - self._all_down_since >= self.give_up_after:
                    self._all_down_since = None  # a later request (a notebook that goes on) gets a window of its own
                    raise self._down_error()
                ready = [s for s in self.servers if s.retry_at <= now]
                if ready:
                    n = len(self.servers)  # fewest requests in flight; ties rotate so equal servers share the load
                    server = min(ready, key=lambda s: (s.in_flight, (self.servers.index(s) - self._turn) % n))
                    self._turn = (self.servers.index(server) + 1) % n
                    server.in_flight += 1
                    return server
                wake = min(s.retry_at for s in self.servers)
                if self._all_down_since is not None:
                    wake = min(wake, self._all_down_since + self.give_up_after)
                self._lock.wait(max(wake - now, 0.0))

    def _failed(self, server: _Server, err: Exception, started: float) -> None:
        with self._lock:
            now = self._clock()
            server.in_flight -= 1
            if started >= server.failed_at:  # requests in flight when it failed do not stretch its back-off again
                server.failures += 1
            server.failed_at = now
            server.last_error = str(err)
            self._last_failure = (server.url, str(err))
            wait = min(self.backoff * 2 ** (server.failures - 1), self.max_backoff)
            server.retry_at = now + wait
            if server.down_since is None:
                server.down_since = self._wall()
                server.outages.append([server.down_since, None])
                others = "its requests go to the other servers; " if len(self.servers) > 1 else ""
                log.warning(
                    "%s %s failed at %s (%s); %strying it again in %.3g s",
                    self.what,
                    server.url,
                    _clock_text(server.down_since),
                    err,
                    others,
                    wait,
                )
            else:
                log.info("%s %s failed again (%s); next try in %.3g s", self.what, server.url, err, wait)
            if self._all_down_since is None and all(s.failures for s in self.servers):
                self._all_down_since = started
            self._lock.notify_all()

    def _succeeded(self, server: _Server) -> None:
        with self._lock:
            server.in_flight -= 1
            if server.down_since is not None:
                back = self._wall()
                server.outages[-1][1] = back
                log.warning(
                    "%s %s is back at %s (down %.1f s, %d failed request(s))",
                    self.what,
                    server.url,
                    _clock_text(back),
                    back - server.down_since,
                    server.failures,
                )
            server.failures, server.retry_at, server.down_since = 0, 0.0, None
            self._all_down_since = None
            self._lock.notify_all()

    def _down_error(self) -> ServersDown:
        url, error = self._last_failure
        names = ", ".join(s.url for s in self.servers)
        who = f"every one of the {self.what}s {names}" if len(self.servers) > 1 else f"the {self.what} {names}"
        return ServersDown(
            f"{who} failed for {self.give_up_after:g} s (timeout x retries); last error ({url}): "
            f"{error}{'. ' + self.hint if self.hint else ''}",
            self.urls,
            error,
        )

    def report(self) -> list[str]:
        """One line per server that failed during the run: when it failed, and when it came back or that it did not."""
        lines = []
        for server in self.servers:
            for failed, back in server.outages:
                came = (
                    f"back at {_clock_text(back)} after {back - failed:.1f} s"
                    if back is not None
                    else "did not come back"
                )
                lines.append(f"{self.what} {server.url} failed at {_clock_text(failed)}, {came}")
        return lines


def _clock_text(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"
