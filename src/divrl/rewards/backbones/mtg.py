"""Client for the DivRL Mind-the-Glitch (MTG) reward server.

DivRL scores generated images with Mind-the-Glitch (two heads on CleanDIFT-SD2.1 features, docs/reference.md). That
model needs a GPU and code that is not on PyPI, so DivRL runs it as a separate HTTP service; this module is only
the client. **The server is started separately by the user** (one worker listens on port 8101 by default; the
round-robin balancer in front of several workers listens on 8098).

Protocol (one JSON request per call)::

    POST {url}/score
    {
      "image_1": ["<base64 PNG>", ...],        # the generated images, in order
      "image_2": "<base64 PNG>",               # the reference image
      "image_2_object_mask": "<base64 PNG>",   # the reference object mask, 8-bit "L" image, or null
      "is_ssm": true,                          # true: nSSM, false: VSM
      "semantic_threshold": 0.7                # tau_s (used by VSM)
    }
    -> 200 {"score": [float, ...]}             # one score per generated image (a bare float for one image)

:class:`MTGServerScorer` sends one such request per requested component (optionally split into several requests
of at most ``max_images_per_request`` images), retries transient failures (connection errors, timeouts, HTTP 5xx
and 429) with exponential backoff, validates every answer, and raises :class:`MTGServerError` when no valid
answer can be had. It never turns a failure into a score.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from divrl.images import ImageLike, to_image_batch, to_mask_batch, to_pil
from divrl.rewards.base import Components, GroupScorer, NonFiniteReward
from divrl.rewards.endpoints import EndpointPool, Retryable, ServersDown

__all__ = ["MTGServerScorer", "MTGServerError", "MTGNonFiniteScore"]

logger = logging.getLogger("divrl.rewards.mtg")

_EXCERPT_CHARS = 500
_SLACK = 1e-4  # float rounding on the server's side is no range violation


class MTGServerError(RuntimeError):
    """The Mind-the-Glitch reward server could not be reached or gave an unusable answer.

    Attributes:
        url: the endpoint that was called.
        attempts: how many requests were made for the failing call.
        status: the last HTTP status code, when the server answered with one.
    """

    def __init__(self, message: str, url: str | None = None, attempts: int | None = None, status: int | None = None):
        super().__init__(message)
        self.url = url
        self.attempts = attempts
        self.status = status


class MTGNonFiniteScore(MTGServerError, NonFiniteReward):
    """The server answered, well-formed, with NaN or infinite scores for a group: training skips and counts the group
    (a :class:`~divrl.rewards.NonFiniteReward`) instead of stopping; ``divrl score`` reports it."""


class _Retryable(Retryable):
    """Internal: a failure worth another attempt (connection error, timeout, 5xx, 429)."""

    def __init__(self, description: str, status: int | None = None):
        super().__init__(description)
        self.status = status


class MTGServerScorer(GroupScorer):
    """Score a group with a running Mind-the-Glitch reward server (nSSM and VSM on CleanDIFT-SD2.1 features).

    The server is not started by this class: run the DivRL MTG reward server (GPU) first, then point ``url`` at
    it. Each requested component costs one request (or ``ceil(G / max_images_per_request)`` requests); the PNG
    encoding of the images is shared by both components.

    Args:
        url: base URL of the server, e.g. ``"http://127.0.0.1:8101"`` (one worker) or ``"http://127.0.0.1:8098"``
            (the round-robin balancer). ``/score`` is appended unless the URL already ends with it.
        urls: several servers in place of ``url``: each request goes to the least-loaded one, a server that fails is
            skipped (the request goes to the others) and tried again after ``backoff`` seconds (doubled per further
            failure), and when every server has failed for ``timeout × retries`` seconds the call raises
            :class:`MTGServerError` naming them (as :class:`~divrl.rewards.RemoteReward`); up to ``max_in_flight``
            groups are scored at once. One URL keeps the attempt semantics below.
        max_in_flight: with ``urls``, how many groups training scores at once (their requests in flight together).
        tau_s: VSM semantic threshold sent as ``semantic_threshold`` (paper and code: 0.7).
        timeout: socket timeout in seconds of each request (applies to connecting and to each read); a request
            that exceeds it counts as a failed attempt and is retried.
        retries: extra attempts after the first one for transient failures (connection errors, timeouts, HTTP 5xx
            and 429). Other HTTP 4xx answers and malformed answers are not retried.
        backoff: seconds to sleep before retry ``k`` (0-based) are ``backoff * 2**k``; 0 retries at once.
        max_images_per_request: send at most this many generated images per request and concatenate the scores
            in order (bounds the server's memory per request); ``None`` sends the whole group at once.
        vsm_nan_as_zero: the published server answers VSM = NaN when no generated cell passes the semantic
            threshold; divrl defines that case as VSM = 0 (the identity penalty applies in full, where the NaN would
            escape it). ``True`` (default) converts exactly those NaNs to 0, logs a warning and counts them in
            ``nan_vsm_count``; ``False`` raises. A NaN nSSM, an infinite score or any other bad value always raises.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8101",
        tau_s: float = 0.7,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_images_per_request: int | None = None,
        vsm_nan_as_zero: bool = True,
        urls: Sequence[str] | None = None,
        max_in_flight: int = 4,
    ):
        super().__init__()
        if urls is not None:
            urls = [urls] if isinstance(urls, str) else list(urls)
            if not urls:
                raise ValueError("urls is empty; give the MTG reward servers' URLs, or url for one")
            url = urls[0]
        if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"url must be an http(s) URL such as 'http://127.0.0.1:8101', got {url!r}")
        if not urllib.parse.urlsplit(url).netloc:
            raise ValueError(f"url must name a host, e.g. 'http://127.0.0.1:8101', got {url!r}")
        if isinstance(tau_s, bool) or not isinstance(tau_s, (int, float)) or not math.isfinite(tau_s):
            raise ValueError(f"tau_s must be a finite number, got {tau_s!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not backoff >= 0:
            raise ValueError(f"backoff must be a non-negative number of seconds, got {backoff!r}")
        if max_images_per_request is not None and (
            isinstance(max_images_per_request, bool)
            or not isinstance(max_images_per_request, int)
            or max_images_per_request < 1
        ):
            raise ValueError(
                f"max_images_per_request must be a positive integer or None, got {max_images_per_request!r}"
            )
        for other in (urls or [])[1:]:
            if (
                not isinstance(other, str)
                or urllib.parse.urlsplit(other).scheme not in ("http", "https")
                or not urllib.parse.urlsplit(other).netloc
            ):
                raise ValueError(f"urls must hold http(s) URLs such as 'http://127.0.0.1:8101', got {other!r}")
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
        base = url.rstrip("/")
        self.url = base
        self.endpoint = base if base.endswith("/score") else base + "/score"
        self.endpoints = [
            u.rstrip("/") if u.rstrip("/").endswith("/score") else u.rstrip("/") + "/score" for u in (urls or [url])
        ]
        self.max_in_flight = max_in_flight if len(self.endpoints) > 1 else 1
        self.pool = (
            EndpointPool(
                self.endpoints,
                give_up_after=float(timeout) * retries,
                backoff=float(backoff),
                what="MTG reward server",
                hint="Start the Mind-the-Glitch reward servers (CleanDIFT-SD2.1, needs a GPU) and check `urls`; if they "
                "are up but slow, raise `timeout` or `retries`",
            )
            if len(self.endpoints) > 1
            else None
        )
        self.tau_s = float(tau_s)
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_images_per_request = max_images_per_request
        self.vsm_nan_as_zero = vsm_nan_as_zero
        self.nan_vsm_count = 0
        self._sleep: Callable[[float], Any] = time.sleep

    def extra_repr(self) -> str:
        return (
            f"url={self.url!r}, tau_s={self.tau_s}, timeout={self.timeout}, retries={self.retries}, "
            f"backoff={self.backoff}, max_images_per_request={self.max_images_per_request}"
        )

    # ------------------------------------------------------------------------------------------------ scoring

    def score_group(
        self,
        reference: ImageLike,
        images: ImageLike | Sequence[ImageLike],
        ref_mask: ImageLike | None = None,
        gen_masks: ImageLike | Sequence[ImageLike] | None = None,
        *,
        need_nssm: bool = True,
        need_vsm: bool = True,
    ) -> Components:
        if gen_masks is not None:
            raise ValueError(
                "MTGServerScorer: the Mind-the-Glitch server protocol has no field for generated-image masks "
                "(only the reference mask, image_2_object_mask); pass gen_masks=None, or use a FeatureScorer "
                "when generated-image masks are needed"
            )
        ref = to_image_batch(reference, "reference")
        if ref.shape[0] != 1:
            raise ValueError(f"reference: expected one image, got a batch of {ref.shape[0]}")
        gen = to_image_batch(images, "images")
        if not (need_nssm or need_vsm):
            return Components(None, None)
        num = gen.shape[0]
        if num == 0:
            empty = torch.zeros(0, dtype=torch.float32)
            return Components(empty.clone() if need_nssm else None, empty.clone() if need_vsm else None)

        ref_png = _png_b64(to_pil(ref[0]))
        mask_png = self._encode_mask(ref_mask, tuple(ref.shape[-2:]))
        gen_png = [_png_b64(to_pil(img)) for img in gen]

        nssm = self._score_component(gen_png, ref_png, mask_png, is_ssm=True) if need_nssm else None
        vsm = self._score_component(gen_png, ref_png, mask_png, is_ssm=False) if need_vsm else None
        return Components(nssm, vsm)

    def _encode_mask(self, ref_mask: ImageLike | None, size: tuple[int, int]) -> str | None:
        mask = to_mask_batch(ref_mask, "ref_mask")
        if mask is None:
            return None
        if mask.shape[0] != 1:
            raise ValueError(f"ref_mask: expected one mask for the reference, got a batch of {mask.shape[0]}")
        if tuple(mask.shape[-2:]) != size:  # the server expects the mask of image_2, at its resolution
            mask = F.interpolate(mask.unsqueeze(1), size=size, mode="bilinear", align_corners=False, antialias=True)
            mask = mask[:, 0]
        array = (mask[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return _png_b64(Image.fromarray(array, mode="L"))

    def _score_component(self, gen_png: list[str], ref_png: str, mask_png: str | None, *, is_ssm: bool) -> Tensor:
        step = self.max_images_per_request or len(gen_png)
        scores: list[float] = []
        for start in range(0, len(gen_png), step):
            chunk = gen_png[start : start + step]
            payload = {
                "image_1": chunk,
                "image_2": ref_png,
                "image_2_object_mask": mask_png,
                "is_ssm": is_ssm,
                "semantic_threshold": self.tau_s,
            }
            what = f"{'nSSM' if is_ssm else 'VSM'} of images {start}..{start + len(chunk) - 1}"
            scores.extend(
                self._request(
                    payload,
                    len(chunk),
                    what,
                    nan_ok=not is_ssm and self.vsm_nan_as_zero,
                    bounds=(0.0, 2.0) if is_ssm else (0.0, 1.0),
                )
            )
        nan = [i for i, v in enumerate(scores) if math.isnan(v)]
        if nan:
            self.nan_vsm_count += len(nan)
            logger.warning(
                "MTG server %s: VSM is NaN for image(s) %s (no cell passed the semantic threshold %.3g); scoring them "
                "VSM = 0 (%d such image(s) so far)",
                self.endpoint,
                nan,
                self.tau_s,
                self.nan_vsm_count,
            )
            scores = [0.0 if math.isnan(v) else v for v in scores]
        return torch.tensor(scores, dtype=torch.float32)

    # ------------------------------------------------------------------------------------------------ HTTP

    @property
    def concurrency(self) -> int:
        """Groups scored at once on threads: ``max_in_flight`` with several servers, else 1."""
        return self.max_in_flight

    def _request(
        self,
        payload: dict,
        expected: int,
        what: str,
        nan_ok: bool = False,
        bounds: tuple[float, float] = (-math.inf, math.inf),
    ) -> list[float]:
        """POST one request with retries (over the servers, with ``urls``); return ``expected`` validated scores
        (finite, within ``bounds``: nSSM ``1 − ρ`` lies in [0, 2], VSM, a fraction, in [0, 1]) or raise
        :class:`MTGServerError`."""
        data = json.dumps(payload).encode("utf-8")
        if self.pool is not None:
            try:
                return self.pool.request(
                    lambda url: self._parse(self._post(data, 1, url), expected, what, 1, nan_ok, bounds, url)
                )
            except ServersDown as err:
                raise MTGServerError(str(err), url=", ".join(err.urls)) from None
        attempts = self.retries + 1
        last: _Retryable | None = None
        for attempt in range(attempts):
            if attempt > 0:
                delay = self.backoff * 2 ** (attempt - 1)
                logger.warning(
                    "MTG server %s (%s): attempt %d/%d failed (%s); retrying in %.3g s",
                    self.endpoint,
                    what,
                    attempt,
                    attempts,
                    last,
                    delay,
                )
                if delay > 0:
                    self._sleep(delay)
            try:
                body = self._post(data, attempt + 1)
            except _Retryable as err:
                last = err
                continue
            return self._parse(body, expected, what, attempt + 1, nan_ok, bounds)
        raise MTGServerError(
            f"MTG reward server at {self.endpoint} failed for the {what} after {attempts} attempt(s); "
            f"last error: {last}. Start the Mind-the-Glitch reward server (CleanDIFT-SD2.1, needs a GPU) and check "
            f"`url` (one worker listens on http://127.0.0.1:8101 by default, the round-robin balancer on :8098); "
            f"if the server is up but slow, raise `timeout` (now {self.timeout:g} s) or `retries` (the scorer's init_args; "
            f"`divrl score --timeout/--retries`).",
            url=self.endpoint,
            attempts=attempts,
            status=last.status if last is not None else None,
        )

    def _post(self, data: bytes, attempt: int, endpoint: str | None = None) -> bytes:
        endpoint = endpoint or self.endpoint
        request = urllib.request.Request(
            endpoint,
            data=data,
            method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            excerpt = _excerpt(_read_error_body(err))
            if err.code >= 500 or err.code == 429:
                raise _Retryable(f"HTTP {err.code} {err.reason}: {excerpt}", status=err.code) from None
            hint = (
                "check `url`: is it the MTG reward server's address?"
                if err.code in (404, 405)
                else "the server rejected the request; check that the server speaks the DivRL MTG protocol"
            )
            raise MTGServerError(
                f"MTG reward server at {endpoint} answered HTTP {err.code} {err.reason} (attempt {attempt}, "
                f"not retried); response: {excerpt}. {hint}",
                url=endpoint,
                attempts=attempt,
                status=err.code,
            ) from None
        except urllib.error.URLError as err:  # connection refused, DNS, timeout while connecting...
            raise _Retryable(f"{type(err.reason).__name__}: {err.reason}") from None
        except (OSError, http.client.HTTPException) as err:  # timeouts and resets while reading, bad status lines
            raise _Retryable(f"{type(err).__name__}: {err or 'no details'}") from None

    def _parse(
        self,
        body: bytes,
        expected: int,
        what: str,
        attempt: int,
        nan_ok: bool = False,
        bounds: tuple[float, float] = (-math.inf, math.inf),
        endpoint: str | None = None,
    ) -> list[float]:
        endpoint = endpoint or self.endpoint

        def fail(problem: str, kind: type[MTGServerError] = MTGServerError) -> MTGServerError:
            return kind(
                f"MTG reward server at {endpoint} gave an unusable answer for the {what}: {problem}; "
                f'response: {_excerpt(body)}. Expected JSON {{"score": [float, ...]}} with {expected} finite '
                f"value(s); check that `url` points at the DivRL MTG reward server.",
                url=endpoint,
                attempts=attempt,
            )

        try:
            answer = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise fail(f"not JSON ({err})") from None
        if not isinstance(answer, dict) or "score" not in answer:
            raise fail("no 'score' key")
        raw = answer["score"]
        if not isinstance(raw, list):
            if expected == 1 and _is_number(raw):
                raw = [raw]
            else:
                raise fail(f"'score' must be a list of {expected} number(s), got {type(raw).__name__}")
        if len(raw) != expected:
            raise fail(f"{len(raw)} score(s) for {expected} image(s)")
        bad = [i for i, v in enumerate(raw) if not _is_number(v)]
        if bad:
            raise fail(f"non-numeric score(s) at position(s) {bad}")
        values = [float(v) for v in raw]
        bad = [i for i, v in enumerate(values) if math.isinf(v) or (math.isnan(v) and not nan_ok)]
        if bad:
            raise fail(f"NaN or infinite score(s) at position(s) {bad}", MTGNonFiniteScore)
        low, high = bounds  # a score outside its component's range is a server bug, never a reward
        out = {i: v for i, v in enumerate(values) if not (low - _SLACK <= v <= high + _SLACK or math.isnan(v))}
        if out:
            raise fail(
                f"score(s) {list(out.values())} at position(s) {list(out)} outside [{low:g}, {high:g}], the "
                f"range of the {what.split()[0]}"
            )
        return values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _read_error_body(err: urllib.error.HTTPError) -> bytes:
    try:
        return err.read() or b""
    except Exception:  # noqa: BLE001 - the body is only used for the message
        return b""


def _excerpt(body: bytes | str) -> str:
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    text = text.strip()
    if not text:
        return "<empty body>"
    if len(text) > _EXCERPT_CHARS:
        text = text[:_EXCERPT_CHARS] + f"... [{len(text) - _EXCERPT_CHARS} more chars]"
    return repr(text)
