""":class:`RemoteReward`: a reward scored by ``divrl serve-reward`` servers (LitServe), usable anywhere a reward is.

The group travels losslessly (:mod:`divrl.rewards.wire`), so a served reward gives exactly the rewards and components
of the same reward run in process. Requests are spread over the servers by load; a server that fails is skipped and
tried again after a back-off (:class:`~divrl.rewards.endpoints.EndpointPool`); when every server has failed for
``timeout × retries`` seconds the run stops with one sentence naming them and the last error. Never a reward of 0.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

import torch

from divrl.rewards.base import (
    Group,
    NonFiniteReward,
    Reward,
    RewardOutput,
    check_setting,
)
from divrl.rewards.endpoints import EndpointPool, Retryable, ServersDown
from divrl.rewards.wire import WireError, decode_output, encode_group

__all__ = ["API_KEY_ENV", "RemoteReward", "RemoteRewardError", "ServersDown"]

log = logging.getLogger("divrl.rewards.remote")

API_KEY_ENV = "DIVRL_REWARD_API_KEY"
"""The environment variable the client (and ``divrl serve-reward``) read the API key from when none is given."""

_EXCERPT = 400


class RemoteRewardError(RuntimeError):
    """A reward server refused a group or answered something that is not a score: the run stops (every server would
    answer the same). The sentence names the server and what to fix."""


class RemoteReward(Reward):
    """Score groups with one or more running ``divrl serve-reward`` servers.

    Start the servers first (``divrl serve-reward --config reward.yaml --port 8000``, on this node or another), then
    name them here. Up to ``max_in_flight`` groups are scored at once (their requests in flight together, spread over
    the servers), during training and, with ``system.overlap_rewards``, while the next rollout runs.

    Args:
        urls: the servers' base URLs (``http://host:port``; ``/predict`` is appended) or one URL.
        timeout: seconds a request may take (connecting, and each read); a slower one counts as a failure. Keep it
            above the servers' ``--timeout`` (the time a request may queue there, 90 s by default), so a busy server
            answers 504 before the client gives up on it and sends the group elsewhere.
        retries: with ``timeout``, how long every server may fail before the run stops: ``timeout × retries`` seconds
            (a failed server is tried again after ``backoff`` seconds, doubled per further failure, at most 30).
            Under DDP the other ranks wait for that long in the next collective: keep ``timeout × retries`` below
            the process group's timeout (30 minutes by default), or the collective times out first.
        max_in_flight: groups scored at once by this client (each rank of a distributed run has its own).
        api_key: the servers' ``--api-key`` (sent as ``X-API-Key``, also needed by their ``/health`` and ``/info``);
            ``None`` reads ``DIVRL_REWARD_API_KEY``, and sends none when that is unset too.
        backoff: seconds before a failed server is tried again (doubled after each further failure).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        timeout: float = 120.0,
        retries: int = 3,
        max_in_flight: int = 4,
        api_key: str | None = None,
        backoff: float = 1.0,
    ):
        super().__init__()
        urls = [urls] if isinstance(urls, str) else list(urls)
        for url in urls:
            parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(
                    f"RemoteReward: init_args.urls must hold http(s) URLs such as 'http://127.0.0.1:8000' "
                    f"(a running `divrl serve-reward`), got {url!r}"
                )
        self.timeout = check_setting("RemoteReward", "timeout", timeout, 0, what="seconds per request")
        if self.timeout == 0:
            raise ValueError(f"RemoteReward: init_args.timeout must be > 0 seconds, got {timeout!r}")
        for name, value, low in (("retries", retries, 1), ("max_in_flight", max_in_flight, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"RemoteReward: init_args.{name} must be an integer >= {low}, got {value!r}")
        self.retries, self.max_in_flight = retries, max_in_flight
        self.backoff = check_setting("RemoteReward", "backoff", backoff, 0, what="seconds")
        if self.backoff == 0:
            raise ValueError(
                "RemoteReward: init_args.backoff must be > 0 seconds (0 would retry a dead server in a "
                "busy loop); the default is 1"
            )
        self.endpoints = [
            u.rstrip("/") if u.rstrip("/").endswith("/predict") else u.rstrip("/") + "/predict" for u in urls
        ]
        self._api_key = api_key
        self.pool = EndpointPool(
            self.endpoints,
            give_up_after=self.timeout * self.retries,
            backoff=self.backoff,
            hint="Start the servers (`divrl serve-reward --config ... --port ...`) and check "
            "RemoteReward's urls; if they are up but slow, raise its timeout or retries",
        )

    def extra_repr(self) -> str:
        return f"urls={self.endpoints}, timeout={self.timeout:g}, retries={self.retries}, max_in_flight={self.max_in_flight}"

    @property
    def concurrency(self) -> int:
        return self.max_in_flight

    @property
    def api_key(self) -> str | None:
        return self._api_key if self._api_key is not None else os.environ.get(API_KEY_ENV) or None

    def forward(self, group: Group) -> RewardOutput:
        if not torch.isfinite(group.images).all():  # in process such images score non-finite: skipped, as here
            raise NonFiniteReward(
                f"identity {group.sample.id!r}: the generated images hold NaN or infinite values; "
                f"not sent to a reward server"
            )
        body = json.dumps(encode_group(group)).encode("utf-8")
        url, answer = self.pool.request(lambda url: (url, self._post(url, body)))
        if isinstance(answer, dict) and set(answer) == {"non_finite"}:
            raise NonFiniteReward(f"reward server {url}: {answer['non_finite']}")
        try:
            return decode_output(answer, group.size)
        except WireError as err:
            raise RemoteRewardError(
                f"reward server {url} answered something that is not a score for identity "
                f"{group.sample.id!r}: {err}; is it a `divrl serve-reward` of this divrl version?"
            ) from None

    def report(self) -> list[str]:
        """The servers that failed during the run, when, and whether they came back."""
        return self.pool.report()

    def _post(self, url: str, body: bytes):
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        request = urllib.request.Request(url, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as err:
            detail = _detail(err)
            if err.code >= 500 or err.code == 429:
                raise Retryable(f"HTTP {err.code}: {detail}") from None
            raise RemoteRewardError(
                f"reward server {url} refused the group (HTTP {err.code}): {detail}{_HINTS.get(err.code, '')}"
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, reset, timed out
            reason = getattr(err, "reason", None) or err
            if isinstance(reason, (ConnectionResetError, BrokenPipeError)):
                self._check_size(url, len(body))  # a server closes the connection on a body over its limit
            raise Retryable(f"{type(reason).__name__}: {reason}") from None
        try:
            return json.loads(text)
        except ValueError:
            raise RemoteRewardError(
                f"reward server {url} answered {text[:_EXCERPT]!r}, not JSON; is it a `divrl serve-reward`?"
            ) from None

    def _check_size(self, url: str, size: int) -> None:
        """:class:`RemoteRewardError` when the server's ``/info`` says it takes less than ``size`` bytes."""
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        info = url.removesuffix("/predict") + "/info"
        try:
            with urllib.request.urlopen(urllib.request.Request(info, headers=headers), timeout=self.timeout) as answer:
                limit = json.loads(answer.read())["server"]["max_payload_size"]
        except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException):
            return  # no answer: the reset stays a server failure
        if isinstance(limit, int) and size > limit:
            raise RemoteRewardError(
                f"reward server {url} takes requests up to {limit / 2**20:.0f} MiB and this group's "
                f"is {size / 2**20:.0f} MiB: raise the servers' --max-request-mb"
            ) from None


_HINTS = {
    401: f". Give the server's --api-key as RemoteReward's api_key or in ${API_KEY_ENV}",
    404: ". Is the URL a `divrl serve-reward` server (its endpoint is /predict)?",
    405: ". Is the URL a `divrl serve-reward` server (its endpoint is /predict)?",
    413: ". The group is larger than the server takes: raise its --max-request-mb",
}


def _detail(err: urllib.error.HTTPError) -> str:
    try:
        text = err.read().decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 - only for the message
        text = ""
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text
    detail = detail if isinstance(detail, str) else json.dumps(detail)
    return (detail[:_EXCERPT] + "...") if len(detail) > _EXCERPT else detail or err.reason
