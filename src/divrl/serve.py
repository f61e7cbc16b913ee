"""``divrl serve-reward``: any divrl :class:`~divrl.rewards.Reward` served on LitServe (Lightning's serving engine).

The reward is the YAML block of one entry of ``model.rewards`` (``class_path`` / ``init_args``), in a file of its
own or picked from a training config with ``--stage`` (:func:`~divrl.rewards.config.reward_block`); each LitServe
worker builds it once (``setup``) on its device. ``POST /predict`` takes one group (:mod:`divrl.rewards.wire`) and
answers its rewards, components and gate; ``GET /health`` answers 200 once every worker is ready. With
``--max-batch-size N`` a worker takes up to N groups from any clients at once and scores them one after the other
with the same reward, so an answer never depends on which groups shared its batch (served = in process, bit for bit).

A request is checked where it arrives, before it reaches a worker: malformed JSON, unknown or missing fields,
undecodable tensors, wrong shapes and non-finite images get HTTP 422 with one sentence naming the field; a body over
``--max-request-mb`` gets 413; a missing or wrong API key 401 (on every endpoint, ``/health`` included: LitServe
applies the key to all). A worker never sees them, so it keeps serving. An error the reward raises on a group gets
422 with the reward's sentence (the run stops, as it would in process); running out of GPU memory gets 503 (the
client tries another server).

This module needs LitServe (``pip install 'divrl[serve]'``); the client, :class:`~divrl.rewards.RemoteReward`, does not.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation to build the endpoint.
import hmac
import logging
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, model_validator

import divrl.data.stream  # noqa: F401 - imported before the HTTP servers fork, not on the first request
from divrl.rewards.base import NonFiniteReward
from divrl.rewards.config import build_reward
from divrl.rewards.wire import WireError, decode_group, encode_output

__all__ = ["GroupRequest", "RewardAPI", "reward_server"]

log = logging.getLogger("divrl.serve")


class GroupRequest(BaseModel):
    """One group to score (:mod:`divrl.rewards.wire`), decoded once on arrival to refuse a malformed one (422)
    before it reaches a worker."""

    model_config = ConfigDict(extra="forbid")

    format: str
    id: str
    prompt: str
    category: str | None
    metadata: dict
    references: list
    masks: list
    tensors: str
    layouts: dict

    @model_validator(mode="after")
    def _decodes(self) -> "GroupRequest":
        try:
            decode_group(self.model_dump())
        except WireError as err:
            raise ValueError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - whatever else a crafted request trips: a 422, never a 500
            raise ValueError(f"the request does not decode ({type(err).__name__}: {err})") from None
        return self


class RewardAPI(ls.LitAPI):
    """The LitServe API of one reward.

    Args:
        block: the reward's YAML block (``class_path``, ``init_args``), built in each worker's :meth:`setup`.
        api_key: the ``X-API-Key`` every request must carry (``None``: none).
        max_batch_size: groups a worker takes at once.
        batch_timeout: seconds a worker waits to fill a batch.
    """

    def __init__(self, block: dict, api_key: str | None = None, max_batch_size: int = 1, batch_timeout: float = 0.0):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.block = block
        self.api_key = api_key

    def setup(self, device) -> None:
        self.reward = build_reward(self.block).to(device).eval().requires_grad_(False)
        self.torch_device = torch.device(device)

    def authorize(self, request: Request) -> None:
        """LitServe's auth hook, on every endpoint: 401 unless the request carries the key."""
        if self.api_key is None:
            return
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise HTTPException(
                401,
                "missing or wrong X-API-Key: give the server's --api-key (RemoteReward's api_key "
                "or $DIVRL_REWARD_API_KEY)",
            )

    def decode_request(self, request: GroupRequest):
        group = decode_group(request.model_dump())
        group.images = group.images.to(self.torch_device)  # where training hands a reward its images
        return group

    def predict(self, groups):
        return [self._score(group) for group in groups] if isinstance(groups, list) else self._score(groups)

    def _score(self, group) -> dict[str, Any]:
        name = type(self.reward).__name__
        with torch.no_grad():
            try:
                return encode_output(self.reward(group))
            except NonFiniteReward as err:
                return {"non_finite": str(err)}
            except torch.cuda.OutOfMemoryError as err:  # this worker's trouble: 503, the client tries another server
                log.error("%s ran out of memory on identity %r: %s", name, group.sample.id, err)
                return {"_status": 503, "detail": f"{name} ran out of GPU memory on this server: {err}"}
            except Exception as err:  # the reward's own error: 422, and the run stops, as it would in process
                log.exception("%s failed on identity %r", name, group.sample.id)
                return {"_status": 422, "detail": f"{name}: {type(err).__name__}: {err}"}

    def encode_response(self, output: dict[str, Any]):
        if "_status" in output:  # per group, so one refused group of a batch does not fail the others
            return JSONResponse({"detail": output["detail"]}, status_code=output["_status"])
        return output


class BodyLimit:
    """Answer 413 as soon as a request's ``Content-Length`` says it is over ``max_bytes``, before reading its body
    (LitServe's own limit counts the body as it arrives, for requests without the header)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope.get("headers") or ()).get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.max_bytes:
                response = JSONResponse(
                    {
                        "detail": f"request body of {int(length) / 2**20:.0f} MiB is too large: this "
                        f"server takes {self.max_bytes / 2**20:.0f} MiB (--max-request-mb)"
                    },
                    status_code=413,
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
    """422 with one sentence per problem; FastAPI's default echoes the (possibly 100 MB) body back."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return JSONResponse({"detail": "; ".join(problems) or "malformed request"}, status_code=422)


def reward_server(
    block: dict,
    *,
    api_key: str | None = None,
    accelerator: str = "auto",
    devices="auto",
    workers_per_device: int = 1,
    max_batch_size: int = 1,
    batch_timeout: float = 0.01,
    max_request_mb: float = 160.0,
    timeout: float = 90.0,
) -> ls.LitServer:
    """The ``LitServer`` of the reward ``block`` (call ``.run(host=..., port=...)``)."""
    api = RewardAPI(block, api_key=api_key, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    limit = int(max_request_mb * 2**20)
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=workers_per_device,
        timeout=timeout,
        max_payload_size=limit,
        disable_openapi_url=True,
        middlewares=[(BodyLimit, {"max_bytes": limit})],
    )
    server.app.add_exception_handler(RequestValidationError, _validation_error)
    return server
