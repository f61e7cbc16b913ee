"""MTGServerScorer against a real local HTTP server speaking the DivRL Mind-the-Glitch protocol.

The fake server decodes the base64 PNGs it receives and scores them with simple pixel formulas, so the tests can
check that the client sent the right images, in the right order, with the right mask and flags.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from divrl.rewards import NSSMReward
from divrl.rewards.backbones.mtg import MTGServerError, MTGServerScorer
from divrl.rewards.base import Components, GroupScorer, NonFiniteReward

G, H, W = 5, 12, 16


# --------------------------------------------------------------------------------------------- the fake server


def _decode_u8(b64: str, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG"
        assert im.mode == mode
        return np.asarray(im).copy()


def _decode(b64: str, mode: str) -> np.ndarray:
    return _decode_u8(b64, mode).astype(np.float64) / 255.0


def _u8(x: torch.Tensor) -> np.ndarray:
    """A [0, 1] tensor, channels moved last when it is an image, as the uint8 array a PNG holds."""
    if x.dim() >= 3:
        x = x.movedim(-3, -1)
    return (x.double() * 255).round().to(torch.uint8).numpy()


def server_nssm(gen: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> float:
    """(H, W, 3) arrays in [0, 1]: masked mean absolute difference."""
    weight = np.ones(ref.shape[:2]) if mask is None else mask
    return float((np.abs(gen - ref) * weight[..., None]).mean())


def server_vsm(gen: np.ndarray, ref: np.ndarray, mask: np.ndarray | None, tau: float) -> float:
    weight = np.ones(ref.shape[:2]) if mask is None else mask
    return float((gen * ref * weight[..., None]).mean() + tau * gen.mean())


class FakeMTG:
    """State shared with the request handler: a script of canned answers, and every request received."""

    def __init__(self):
        self.requests: list[dict] = []  # JSON bodies, failed attempts included
        self.script: list[tuple] = []  # consumed one per request; empty → compute the real scores
        self.release = threading.Event()  # wakes up "sleep" answers at teardown
        self.lock = threading.Lock()

    def answer(self, body: dict) -> tuple[int, bytes]:
        with self.lock:
            self.requests.append(body)
            action = self.script.pop(0) if self.script else ("compute",)
        kind = action[0]
        if kind == "status":  # ("status", code, text)
            return action[1], action[2].encode()
        if kind == "raw":  # ("raw", text) with status 200
            return 200, action[1].encode()
        if kind == "sleep":  # ("sleep", seconds), then compute
            self.release.wait(action[1])
        ref = _decode(body["image_2"], "RGB")
        mask = None if body["image_2_object_mask"] is None else _decode(body["image_2_object_mask"], "L")
        gens = [_decode(b, "RGB") for b in body["image_1"]]
        if body["is_ssm"]:
            scores = [server_nssm(g, ref, mask) for g in gens]
        else:
            scores = [server_vsm(g, ref, mask, body["semantic_threshold"]) for g in gens]
        return 200, json.dumps({"score": scores}).encode()


@pytest.fixture
def server():
    with fake_server() as fake:
        yield fake


@pytest.fixture
def second_server():
    with fake_server() as fake:
        yield fake


@contextlib.contextmanager
def fake_server():
    fake = FakeMTG()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            if self.path != "/score":
                code, out = 404, b"no such route"
            else:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, out = fake.answer(body)
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)
            except OSError:  # the client gave up (timeout test)
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.handle_error = lambda *args: None
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield fake
    finally:
        fake.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def make_scorer(url: str, **kwargs) -> tuple[MTGServerScorer, list[float]]:
    kwargs.setdefault("timeout", 5.0)
    scorer = MTGServerScorer(url, **kwargs)
    sleeps: list[float] = []
    scorer._sleep = sleeps.append
    return scorer, sleeps


# --------------------------------------------------------------------------------------------- test data


def uint8_images(n: int, seed: int) -> torch.Tensor:
    """Float images whose values are exact multiples of 1/255, so the PNG round trip is lossless."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, H, W), generator=g).float() / 255.0


def expected(gen: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None, tau: float) -> tuple:
    """The server's formulas, recomputed independently on the tensors (float64)."""
    gen, ref = gen.double(), ref.double()
    weight = torch.ones(H, W, dtype=torch.float64) if mask is None else mask.double()
    nssm = ((gen - ref).abs() * weight).mean(dim=(1, 2, 3))
    vsm = (gen * ref * weight).mean(dim=(1, 2, 3)) + tau * gen.mean(dim=(1, 2, 3))
    return nssm, vsm


@pytest.fixture
def group():
    gen = uint8_images(G, seed=0)
    ref = uint8_images(1, seed=1)[0]
    mask = torch.rand(H, W, generator=torch.Generator().manual_seed(2)) > 0.4
    return gen, ref, mask


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("with_mask", [False, True])
def test_round_trip_both_components(server, group, with_mask):
    gen, ref, mask = group
    scorer, sleeps = make_scorer(server.url, tau_s=0.55)
    assert isinstance(scorer, GroupScorer)
    out = scorer.score_group(ref, gen, ref_mask=mask if with_mask else None)

    assert isinstance(out, Components)
    want_nssm, want_vsm = expected(gen, ref, mask.float() if with_mask else None, 0.55)
    for got, want in ((out.nssm, want_nssm), (out.vsm, want_vsm)):
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (G,)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    assert not torch.allclose(out.nssm, out.nssm[0].expand(G))  # the scores really differ per image

    assert [r["is_ssm"] for r in server.requests] == [True, False]
    for body in server.requests:
        assert body["semantic_threshold"] == 0.55
        assert len(body["image_1"]) == G
        sent = np.stack([_decode_u8(b, "RGB") for b in body["image_1"]])
        np.testing.assert_array_equal(sent, _u8(gen))  # same images, same order
        np.testing.assert_array_equal(_decode_u8(body["image_2"], "RGB"), _u8(ref))
        if with_mask:
            np.testing.assert_array_equal(_decode_u8(body["image_2_object_mask"], "L"), _u8(mask.float()))
        else:
            assert body["image_2_object_mask"] is None
    assert sleeps == []


def test_mask_at_another_resolution_is_resized_to_the_reference(server, group):
    gen, ref, _ = group
    scorer, _ = make_scorer(server.url)
    small = torch.ones(H // 2, W // 2)
    scorer.score_group(ref, gen, ref_mask=small, need_vsm=False)
    sent = _decode(server.requests[0]["image_2_object_mask"], "L")
    assert sent.shape == (H, W)
    np.testing.assert_array_equal(sent, np.ones((H, W)))


def test_need_nssm_only_sends_one_request(server, group):
    gen, ref, _ = group
    scorer, _ = make_scorer(server.url)
    out = scorer.score_group(ref, gen, need_nssm=True, need_vsm=False)
    assert out.vsm is None and out.nssm.shape == (G,)
    assert len(server.requests) == 1 and server.requests[0]["is_ssm"] is True

    out = scorer.score_group(ref, gen, need_nssm=False, need_vsm=True)
    assert out.nssm is None and out.vsm.shape == (G,)
    assert len(server.requests) == 2 and server.requests[1]["is_ssm"] is False


def test_max_images_per_request_splits_and_concatenates(server, group):
    gen, ref, mask = group
    scorer, _ = make_scorer(server.url, max_images_per_request=2)
    out = scorer.score_group(ref, gen, ref_mask=mask)
    want_nssm, want_vsm = expected(gen, ref, mask.float(), 0.7)
    torch.testing.assert_close(out.nssm.double(), want_nssm, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.vsm.double(), want_vsm, atol=1e-6, rtol=0)
    assert [(r["is_ssm"], len(r["image_1"])) for r in server.requests] == [
        (True, 2),
        (True, 2),
        (True, 1),
        (False, 2),
        (False, 2),
        (False, 1),
    ]
    sent = [_decode_u8(b, "RGB") for r in server.requests[:3] for b in r["image_1"]]
    np.testing.assert_array_equal(np.stack(sent), _u8(gen))


def test_single_image_bare_float_answer(server, group):
    gen, ref, _ = group
    scorer, _ = make_scorer(server.url)
    server.script = [("raw", '{"score": 0.25}')]
    out = scorer.score_group(ref, gen[:1], need_vsm=False)
    assert out.nssm.tolist() == [0.25]


def test_retries_5xx_then_succeeds(server, group, caplog):
    gen, ref, _ = group
    scorer, sleeps = make_scorer(server.url, retries=3, backoff=1.0)
    server.script = [("status", 500, "boom"), ("status", 500, "boom again")]
    with caplog.at_level(logging.WARNING, logger="divrl.rewards.mtg"):
        out = scorer.score_group(ref, gen, need_vsm=False)
    torch.testing.assert_close(out.nssm.double(), expected(gen, ref, None, 0.7)[0], atol=1e-6, rtol=0)
    assert len(server.requests) == 3
    assert sleeps == [1.0, 2.0]
    retries = [r for r in caplog.records if r.name == "divrl.rewards.mtg"]
    assert len(retries) == 2 and "HTTP 500" in retries[0].getMessage()


def test_retries_429(server, group):
    gen, ref, _ = group
    scorer, sleeps = make_scorer(server.url, retries=1, backoff=0.5)
    server.script = [("status", 429, "slow down")]
    out = scorer.score_group(ref, gen, need_vsm=False)
    assert out.nssm.shape == (G,) and len(server.requests) == 2 and sleeps == [0.5]


def test_always_503_raises_after_all_attempts(server, group):
    gen, ref, _ = group
    scorer, sleeps = make_scorer(server.url, retries=3, backoff=0.25)
    server.script = [("status", 503, "overloaded")] * 10
    with pytest.raises(MTGServerError) as info:
        scorer.score_group(ref, gen)
    message = str(info.value)
    assert server.url in message and "4 attempt" in message and "503" in message and "overloaded" in message
    assert "url" in message  # says how to fix it
    assert info.value.attempts == 4 and info.value.status == 503
    assert len(server.requests) == 4  # the VSM request is never sent after nSSM failed
    assert sleeps == [0.25, 0.5, 1.0]


def test_4xx_is_not_retried(server, group):
    gen, ref, _ = group
    scorer, sleeps = make_scorer(server.url, retries=3)
    server.script = [("status", 400, "bad request: image_2 is not a PNG")]
    with pytest.raises(MTGServerError, match="image_2 is not a PNG") as info:
        scorer.score_group(ref, gen)
    assert "400" in str(info.value) and info.value.attempts == 1
    assert len(server.requests) == 1 and sleeps == []


def test_wrong_path_404_is_not_retried(server, group):
    gen, ref, _ = group
    scorer, sleeps = make_scorer(server.url + "/api")
    with pytest.raises(MTGServerError, match="404"):
        scorer.score_group(ref, gen)
    assert sleeps == []


@pytest.mark.parametrize(
    "body, problem",
    [
        ('{"scores": [0.1, 0.2, 0.3, 0.4, 0.5]}', "no 'score' key"),
        ('{"score": [0.1, 0.2]}', "2 score(s) for 5"),
        ('{"score": [0.1, NaN, 0.3, 0.4, 0.5]}', "NaN"),
        ('{"score": [0.1, 0.2, Infinity, 0.4, 0.5]}', "infinite"),
        ('{"score": [0.1, "x", 0.3, 0.4, 0.5]}', "non-numeric"),
        ('{"score": [0.1, null, 0.3, 0.4, 0.5]}', "non-numeric"),
        ('{"score": 0.5}', "must be a list"),
        ("<html>oops</html>", "not JSON"),
        ("[0.1, 0.2, 0.3, 0.4, 0.5]", "no 'score' key"),
    ],
)
def test_malformed_answers_raise(server, group, body, problem):
    gen, ref, _ = group
    scorer, _ = make_scorer(server.url)
    server.script = [("raw", body)]
    with pytest.raises(MTGServerError) as info:
        scorer.score_group(ref, gen)
    message = str(info.value)
    assert problem in message and server.url in message
    assert body[:20] in message  # the response excerpt
    assert len(server.requests) == 1  # a protocol mismatch is not retried


def test_nothing_listening_raises_fast():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    scorer, sleeps = make_scorer(url, timeout=0.5, retries=2, backoff=1.0)
    start = time.monotonic()
    with pytest.raises(MTGServerError) as info:
        scorer.score_group(uint8_images(1, 3)[0], uint8_images(2, 4))
    assert time.monotonic() - start < 3.0
    message = str(info.value)
    assert url in message and "3 attempt" in message and "Start the Mind-the-Glitch reward server" in message
    assert sleeps == [1.0, 2.0]


def test_slow_server_times_out_then_raises(server, group):
    gen, ref, _ = group
    scorer, sleeps = make_scorer(server.url, timeout=0.3, retries=1, backoff=0.0)
    server.script = [("sleep", 5.0), ("sleep", 5.0)]
    start = time.monotonic()
    with pytest.raises(MTGServerError, match="2 attempt") as info:
        scorer.score_group(ref, gen, need_vsm=False)
    assert time.monotonic() - start < 3.0
    assert "timed out" in str(info.value).lower() or "timeout" in str(info.value).lower()
    assert len(server.requests) == 2 and sleeps == []


def test_slow_once_then_recovers(server, group):
    gen, ref, _ = group
    scorer, sleeps = make_scorer(server.url, timeout=0.3, retries=2, backoff=0.1)
    server.script = [("sleep", 5.0)]
    out = scorer.score_group(ref, gen, need_vsm=False)
    torch.testing.assert_close(out.nssm.double(), expected(gen, ref, None, 0.7)[0], atol=1e-6, rtol=0)
    assert sleeps == [0.1]


def test_gen_masks_rejected(server, group):
    gen, ref, mask = group
    scorer, _ = make_scorer(server.url)
    with pytest.raises(ValueError, match="generated-image masks"):
        scorer.score_group(ref, gen, gen_masks=[mask] * G)
    assert server.requests == []


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        MTGServerScorer("127.0.0.1:8101")
    with pytest.raises(ValueError):
        MTGServerScorer("http://127.0.0.1:8101", retries=-1)
    with pytest.raises(ValueError):
        MTGServerScorer("http://127.0.0.1:8101", timeout=0)
    with pytest.raises(ValueError):
        MTGServerScorer("http://127.0.0.1:8101", max_images_per_request=0)
    with pytest.raises(ValueError):
        MTGServerScorer("http://127.0.0.1:8101", tau_s=math.nan)
    scorer = MTGServerScorer("http://127.0.0.1:8101/")
    assert scorer.endpoint == "http://127.0.0.1:8101/score"
    assert MTGServerScorer("http://127.0.0.1:8098/score").endpoint == "http://127.0.0.1:8098/score"


def test_vsm_nan_from_the_published_server_means_no_match(server, group, caplog):
    """The published server answers VSM = NaN when no cell passes tau_s; that is VSM = 0 by definition."""
    gen, ref, _ = group
    scorer, _ = make_scorer(server.url)
    server.script = [("compute",), ("raw", '{"score": [0.1, NaN, 0.3, NaN, 0.5]}')]
    with caplog.at_level("WARNING", logger="divrl.rewards.mtg"):
        out = scorer.score_group(ref, gen)
    assert out.vsm.tolist() == pytest.approx([0.1, 0.0, 0.3, 0.0, 0.5])
    assert scorer.nan_vsm_count == 2 and "VSM is NaN for image(s) [1, 3]" in caplog.text
    strict, _ = make_scorer(server.url, vsm_nan_as_zero=False)
    server.script = [("compute",), ("raw", '{"score": [0.1, NaN, 0.3, NaN, 0.5]}')]
    with pytest.raises(MTGServerError, match="NaN"):
        strict.score_group(ref, gen)
    server.script = [("raw", '{"score": [0.1, NaN, 0.3, 0.4, 0.5]}')]  # a NaN nSSM is never accepted
    with pytest.raises(MTGServerError, match="NaN") as raised:
        scorer.score_group(ref, gen)
    # ... and in training it is a non-finite reward: the group is skipped and counted, the run goes on
    assert isinstance(raised.value, NonFiniteReward)


def test_divrl_score_passes_timeout_and_retries_to_the_server_scorer(server, tmp_path):
    from divrl.cli import main

    ref, gen = tmp_path / "ref.png", tmp_path / "gen.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(ref)
    Image.new("RGB", (16, 16), (30, 200, 30)).save(gen)
    server.script = [("status", 503, "overloaded")] * 3
    with pytest.raises(MTGServerError, match=r"raise `timeout` \(now 7 s\)") as raised:
        main(
            [
                "score",
                "--mtg-url",
                server.url,
                "--timeout",
                "7",
                "--retries",
                "1",
                "--size",
                "16",
                "--reference",
                str(ref),
                str(gen),
            ]
        )
    assert raised.value.attempts == 2 and len(server.requests) == 2  # one retry, as asked


@pytest.mark.parametrize(
    ("component", "score", "bounds"),
    [("nssm", -5.0, "[0, 2]"), ("nssm", 2.5, "[0, 2]"), ("vsm", 1.5, "[0, 1]"), ("vsm", -0.2, "[0, 1]")],
)
def test_scores_outside_the_components_range_are_refused_not_used(server, group, component, score, bounds):
    """A server answering nSSM = −5 once gave R2 = −156: a score no reward can take is a broken server, not a reward
    (and not a skipped group: like a non-numeric answer it stops the run)."""
    gen, ref, _ = group
    scorer, _ = make_scorer(server.url)
    server.script = [("raw", json.dumps({"score": [0.5, 0.5, score, 0.5, 0.5]}))]
    with pytest.raises(MTGServerError) as info:
        scorer.score_group(ref, gen, need_nssm=component == "nssm", need_vsm=component == "vsm")
    assert not isinstance(info.value, NonFiniteReward)
    message = str(info.value)
    assert f"score(s) [{score}] at position(s) [2] outside {bounds}" in message and server.url in message
    assert ("nSSM" if component == "nssm" else "VSM") in message


def test_scores_on_the_edge_of_the_range_are_kept(server, group):
    gen, ref, _ = group
    scorer, _ = make_scorer(server.url)
    server.script = [
        ("raw", json.dumps({"score": [0.0, 2.0, 2.00001, 1.0, 0.0]})),
        ("raw", json.dumps({"score": [0.0, 1.0, 1.00001, 0.5, 0.0]})),
    ]
    out = scorer.score_group(ref, gen)
    assert out.nssm.tolist() == pytest.approx([0.0, 2.0, 2.00001, 1.0, 0.0])
    assert out.vsm.tolist() == pytest.approx([0.0, 1.0, 1.00001, 0.5, 0.0])


def test_several_urls_fail_over_to_the_server_that_answers(server, second_server, group, caplog):
    gen, ref, mask = group
    server.script = [("status", 503, "overloaded")] * 10
    scorer = MTGServerScorer(urls=[server.url, second_server.url], timeout=5.0, retries=3, backoff=30.0)
    with caplog.at_level(logging.WARNING, logger="divrl.rewards.endpoints"):
        nssm, vsm = scorer.score_group(ref, gen, mask)
    want_nssm, want_vsm = expected(gen, ref, mask.float(), 0.7)
    assert torch.allclose(nssm.double(), want_nssm, atol=1e-5) and torch.allclose(vsm.double(), want_vsm, atol=1e-5)
    assert len(server.requests) == 1 and len(second_server.requests) == 2  # the failed one is in its back-off
    assert f"MTG reward server {server.url}/score failed at" in caplog.text and "HTTP 503" in caplog.text
    assert scorer.concurrency == 4 and NSSMReward(scorer).concurrency == 4


def test_every_url_down_raises_naming_them_within_timeout_times_retries():
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    scorer = MTGServerScorer(urls=urls, timeout=0.4, retries=2, backoff=0.05)
    start = time.monotonic()
    with pytest.raises(MTGServerError, match=r"every one of the MTG reward servers .* failed for 0.8 s") as info:
        scorer.score_group(uint8_images(1, 0)[0], uint8_images(2, 1))
    assert 0.8 <= time.monotonic() - start < 3 and all(f"{u}/score" in str(info.value) for u in urls)
