"""Rewards as a service: the wire format, the failover pool, and real ``divrl serve-reward`` servers (LitServe) on
127.0.0.1 ports of their own: served = in process bit for bit, and malformed requests refused with 4xx while the
worker keeps serving."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.servers import RewardServer, listening
from PIL import Image
from safetensors.torch import save as save_tensors

from divrl.data.stream import ConditionSample
from divrl.rewards import Group, NonFiniteReward, RemoteReward, Reward, RewardOutput
from divrl.rewards.config import build_reward, reward_block
from divrl.rewards.endpoints import EndpointPool, Retryable, ServersDown
from divrl.rewards.remote import RemoteRewardError
from divrl.rewards.wire import (
    FORMAT,
    WireError,
    decode_group,
    decode_output,
    encode_group,
    encode_output,
)

ROOT = Path(__file__).resolve().parents[1]

DENSE = {"class_path": "divrl.rewards.backbones.DenseDescriptor", "init_args": {"grid_size": 24, "cell": 4}}
GATED = {
    "class_path": "divrl.rewards.GatedReward",
    "init_args": {
        "threshold": 0.5,
        "weight": 5.0,
        "scorer": {"class_path": "divrl.rewards.FeatureScorer", "init_args": {"backbone": DENSE, "pool": 2}},
    },
}
PSR = {
    "class_path": "divrl.rewards.PairwiseSubjectConsistency",
    "init_args": {
        "embedder": {"class_path": "divrl.rewards.BackboneEmbedder", "init_args": {"size": 32, "backbone": DENSE}},
        "locator": {
            "class_path": "divrl.rewards.SubjectLocator",
            "init_args": {"detector": {"class_path": "divrl.rewards.PlainBackgroundDetector"}},
        },
        "on_missing": "score",
    },
}


CALLABLE = {"class_path": "divrl.rewards.CallableReward", "init_args": {"fn": "helpers.servers.brightness"}}


def photo(seed: int, size: int = 48, mode: str = "RGB") -> Image.Image:
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray((np.random.RandomState(seed).rand(*shape) * 255).astype(np.uint8), mode=None)


def single_group(seed: int, g: int = 4) -> Group:
    """A reference photo with a mask and ``g`` generated images, as training hands them to a reward."""
    torch.manual_seed(seed)
    mask = Image.fromarray(((np.arange(48)[None, :] > 12) & (np.arange(48)[:, None] > 8)).astype(np.uint8) * 255)
    sample = ConditionSample(f"id{seed}", "a photo", [photo(seed)], [mask], "toy", {"source": "test"})
    return Group(sample, torch.rand(g, 3, 48, 48))


def pair_group(shift: int) -> Group:
    """Two subjects on white, the multi-subject reward's world (as tests/test_multi_rewards.py)."""

    def canvas(*boxes):
        image = torch.ones(3, 64, 64)
        for colour, (x0, y0, x1, y1) in boxes:
            image[:, y0:y1, x0:x1] = torch.tensor(colour)[:, None, None]
        return image

    red, blue = (0.9, 0.1, 0.1), (0.1, 0.2, 0.9)
    refs = [
        Image.fromarray((canvas((red, (20, 22, 44, 42))).permute(1, 2, 0).numpy() * 255).astype(np.uint8)),
        canvas((blue, (16, 16, 48, 48))),
    ]  # one PIL reference, one tensor reference: both travel
    images = torch.stack(
        [
            canvas((red, (4 + shift, 10, 24 + shift, 40)), (blue, (34, 20, 60, 50))),
            canvas((blue, (4, 10, 24, 40)), (red, (34, 20, 60 - shift, 50))),
        ]
    )
    sample = ConditionSample("pair", "red square and blue disc", refs, None, None, {"subjects": ["square", "disc"]})
    return Group(sample, images)


def same(a: RewardOutput, b: RewardOutput) -> bool:
    return (
        torch.equal(a.reward, b.reward)
        and a.components.keys() == b.components.keys()
        and all(torch.equal(a.components[k], b.components[k]) for k in a.components)
        and torch.equal(a.gated, b.gated)
    )


# ---------------------------------------------------------------------------------------------------- wire format


def test_a_group_travels_bit_for_bit():
    group = single_group(0)
    group.images = group.images.contiguous(memory_format=torch.channels_last)  # as a decoded batch often is
    group.sample.references.append(torch.rand(3, 20, 24))
    group.sample.masks.append(np.ones((20, 24), dtype=np.float32))
    group.gen_masks = torch.rand(4, 48, 48)
    request = json.loads(json.dumps(encode_group(group)))  # through text, as on the wire
    back = decode_group(request)
    assert torch.equal(back.images, group.images) and torch.equal(back.gen_masks, group.gen_masks)
    assert back.images.stride() == group.images.stride() and request["layouts"] == {"images": [0, 2, 3, 1]}
    assert back.sample.references[0].mode == "RGB"
    assert np.array_equal(np.asarray(back.sample.references[0]), np.asarray(group.sample.references[0]))
    assert np.array_equal(np.asarray(back.sample.masks[0]), np.asarray(group.sample.masks[0]))
    assert torch.equal(back.sample.references[1], group.sample.references[1])
    assert isinstance(back.sample.masks[1], np.ndarray) and np.array_equal(back.sample.masks[1], group.sample.masks[1])
    assert (back.sample.id, back.sample.prompt, back.sample.category, back.sample.metadata) == (
        "id0",
        "a photo",
        "toy",
        {"source": "test"},
    )


def test_an_output_travels_bit_for_bit():
    values = torch.rand(5) * 1e-3 + torch.tensor([1 / 3, 1e-30, -7.1, 0.0, 2.0])  # float32 values with long expansions
    out = RewardOutput(values, {"nssm": values * 3, "vsm": values / 7}, torch.tensor([True, False, True, False, False]))
    assert same(decode_output(json.loads(json.dumps(encode_output(out))), 5), out)


def _with(request: dict, **tensors) -> dict:
    blob = {"images": torch.rand(2, 3, 16, 16), "reference.0": torch.zeros(16, 16, 3, dtype=torch.uint8)}
    blob.update(tensors)
    return {
        **request,
        "tensors": base64.b64encode(save_tensors({k: v for k, v in blob.items() if v is not None})).decode(),
    }


BASE = {
    "format": FORMAT,
    "id": "x",
    "prompt": "p",
    "category": None,
    "metadata": {},
    "references": [{"kind": "pil", "mode": "RGB"}],
    "masks": [None],
    "layouts": {},
}


@pytest.mark.parametrize(
    "request_, message",
    [
        ({**BASE, "extra": 1}, r"unknown fields \['extra'\]"),
        ({k: v for k, v in BASE.items() if k != "prompt"}, r"no \['prompt'"),
        ({**BASE, "format": "divrl.group/0"}, "different divrl versions"),
        ({**BASE, "tensors": "@@@"}, "not base64"),
        ({**BASE, "tensors": base64.b64encode(b"not safetensors").decode()}, "not a safetensors file"),
        (_with(BASE, images=torch.rand(2, 16, 16)), r"'images' has shape \[2, 16, 16\]"),
        (_with(BASE, images=torch.zeros(2, 3, 16, 16, dtype=torch.uint8)), "dtype torch.uint8"),
        (_with(BASE, images=torch.full((2, 3, 16, 16), float("nan"))), r"NaN or infinite values \(images \[0, 1\]\)"),
        (_with(BASE, images=None), "holds no 'images'"),
        (_with(BASE, **{"reference.0": None}), "holds no 'reference.0'"),
        (_with(BASE, **{"mask.3": torch.zeros(2)}), r"unknown tensors \['mask.3'\]"),
        (_with({**BASE, "masks": []}), "masks a list of the same length"),
        (_with({**BASE, "references": [{"kind": "pil", "mode": "L"}]}), "is a 'RGB' image, the request says 'L'"),
        (_with({**BASE, "references": [{"kind": "path"}]}), "expected"),
        (_with({**BASE, "id": 3}), "id must be a string"),
        (_with(BASE, gen_masks=torch.rand(3, 16, 16)), "one mask per image"),
        (_with({**BASE, "layouts": {"images": [0, 1, 1, 3]}}), r"layouts\['images'\] must be an order"),
        (_with({**BASE, "layouts": {"gen_masks": [0, 1, 2]}}), "layouts names 'gen_masks'"),
    ],
)
def test_malformed_requests_are_refused_naming_the_field(request_, message):
    with pytest.raises(WireError, match=message):
        decode_group(
            request_ if "tensors" in request_ or "extra" in request_ or "prompt" not in request_ else _with(request_)
        )


def test_what_cannot_travel_is_refused_at_the_client():
    group = single_group(0)
    group.sample.metadata["when"] = object()
    with pytest.raises(ValueError, match="metadata cannot be sent"):
        encode_group(group)
    group = single_group(0)
    group.sample.references[0] = "photo.png"
    with pytest.raises(ValueError, match="reference.0 is a str"):
        encode_group(group)


# ---------------------------------------------------------------------------------------------------- the pool


def test_requests_go_to_the_least_loaded_server():
    pool = EndpointPool(["a", "b", "c"], give_up_after=5)
    seen, gate = [], threading.Event()

    def send(url):
        seen.append(url)
        gate.wait(5)
        return url

    threads = [threading.Thread(target=pool.request, args=(send,)) for _ in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    gate.set()
    for t in threads:
        t.join()
    assert sorted(seen) == ["a", "a", "b", "b", "c", "c"] and seen[:3] == ["a", "b", "c"]


def test_a_failing_server_is_skipped_and_readmitted_after_its_backoff(caplog):
    pool = EndpointPool(["a", "b"], give_up_after=5, backoff=0.2)
    broken = {"a"}

    def send(url):
        if url in broken:
            raise Retryable("connection refused")
        return url

    with caplog.at_level(logging.INFO, logger="divrl.rewards.endpoints"):
        assert [pool.request(send) for _ in range(4)] == ["b"] * 4  # a failed once, then waits out its back-off
        broken.clear()
        time.sleep(0.25)
        assert {pool.request(send) for _ in range(4)} == {"a", "b"}
    text = caplog.text
    assert "reward server a failed at" in text and "its requests go to the other servers" in text
    assert "reward server a is back at" in text and "1 failed request(s)" in text
    assert pool.report()[0].startswith("reward server a failed at") and "back at" in pool.report()[0]


def test_every_server_down_stops_within_the_configured_time():
    pool = EndpointPool(["a", "b"], give_up_after=0.5, backoff=0.05, hint="Start them.")

    def send(url):
        raise Retryable(f"{url}: connection refused")

    start = time.monotonic()
    with pytest.raises(
        ServersDown,
        match=r"every one of the reward servers a, b failed for 0.5 s .*connection refused. "
        r"Start them.",
    ):
        pool.request(send)
    assert 0.5 <= time.monotonic() - start < 1.5
    assert all("did not come back" in line for line in pool.report())


def test_a_refusal_is_not_retried_elsewhere():
    pool, calls = EndpointPool(["a", "b"], give_up_after=5), []

    def send(url):
        calls.append(url)
        raise RemoteRewardError("refused")

    with pytest.raises(RemoteRewardError):
        pool.request(send)
    assert calls == ["a"] and all(s.in_flight == 0 for s in pool.servers)


# ---------------------------------------------------------------------------------------------------- config


def test_the_servers_request_model_has_the_wire_formats_fields():
    serve = pytest.importorskip("divrl.serve")
    from divrl.rewards.wire import FIELDS

    assert set(serve.GroupRequest.model_fields) == set(FIELDS)


def test_a_stage_reward_is_read_from_a_training_config(in_repository_root):
    assert reward_block("configs/demo.yaml", 2)["class_path"] == "divrl.rewards.GatedReward"
    with pytest.raises(ValueError, match="has 2 stage rewards; pick one with --stage 1..2"):
        reward_block("configs/demo.yaml")
    with pytest.raises(ValueError, match="--stage 3: configs/demo.yaml has stages 1..2"):
        reward_block("configs/demo.yaml", 3)
    with pytest.raises(ValueError, match="not a divrl reward"):
        build_reward({"class_path": "divrl.rewards.NSSMReward", "init_args": {"scorer": 3}})


def test_the_remote_rewards_overlay_parses_on_top_of_a_config(tmp_path, in_repository_root):
    from divrl.cli import run_lightning

    cli = run_lightning(
        [
            "--config",
            "configs/demo.yaml",
            "--config",
            "examples/reward_service/remote_rewards.yaml",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
    )
    rewards = cli.model.rewards
    assert [type(r).__name__ for r in rewards] == ["RemoteReward", "RemoteReward"]
    assert [r.endpoints for r in rewards] == [["http://reward-node:8001/predict"], ["http://reward-node:8002/predict"]]
    assert cli.model.system.overlap_rewards is True and cli.model.system.rollout_chunk_groups == 1
    serve = (ROOT / "examples/reward_service/serve.sh").read_text()
    assert "--config configs/explore.yaml --stage 1" in serve and "--stage 2" in serve
    assert reward_block(ROOT / "configs/explore.yaml", 2)["class_path"] == "divrl.rewards.GatedReward"


# ---------------------------------------------------------------------------------------------------- real servers


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-dinov2")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=28
    )
    transformers.Dinov2Model(config).eval().save_pretrained(folder)
    processor = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    processor(image_mean=[0.3, 0.4, 0.5], image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_dinov2):
    """Four servers: the dense gated reward (with an API key, batches of 4), DINOv2 tiny R2, PSR, and a
    CallableReward (requests up to 1 MiB)."""
    pytest.importorskip("litserve")
    folder = tmp_path_factory.mktemp("servers")
    dinov2 = {
        "class_path": "divrl.rewards.GatedReward",
        "init_args": {
            "threshold": 0.5,
            "weight": 5.0,
            "scorer": {
                "class_path": "divrl.rewards.FeatureScorer",
                "init_args": {
                    "pool": 2,
                    "backbone": {
                        "class_path": "divrl.rewards.backbones.DINOv2Backbone",
                        "init_args": {"model": str(tiny_dinov2), "grid_size": 8, "local_files_only": True},
                    },
                },
            },
        },
    }
    started = {
        "dense": RewardServer(GATED, folder, "--max-batch-size", "4", api_key="sesame"),
        "dinov2": RewardServer(dinov2, folder),
        "psr": RewardServer(PSR, folder),
        "callable": RewardServer(CALLABLE, folder, "--max-request-mb", "1"),
    }
    blocks = {"dense": GATED, "dinov2": dinov2, "psr": PSR, "callable": CALLABLE}
    try:
        yield {name: (server.wait_ready(), build_reward(blocks[name])) for name, server in started.items()}
    finally:
        for server in started.values():
            server.stop()
        assert not any(listening(server.port) for server in started.values())


@pytest.mark.slow  # four real servers: ~35 s on 2 cores
@pytest.mark.parametrize("name", ["dense", "dinov2", "psr", "callable"])
def test_served_equals_in_process(servers, name):
    server, local = servers[name]
    remote = RemoteReward(server.url, timeout=30, api_key=server.api_key)
    groups = [pair_group(s) for s in (0, 3, 6)] if name == "psr" else [single_group(s) for s in range(3)]
    for group in list(groups):  # and each as training hands it over: a channels-last slice of the decoded batch
        layout = group.images.contiguous(memory_format=torch.channels_last)
        groups.append(Group(group.sample, torch.cat([layout, layout])[: group.size]))
    assert all(g.images.stride()[1] == 1 and not g.images.is_contiguous() for g in groups[len(groups) // 2 :])
    for group in groups:
        assert same(remote(group), local(group))


@pytest.mark.slow  # four real servers: ~35 s on 2 cores
def test_batched_groups_from_several_clients_equal_in_process(servers):
    server, local = servers["dense"]
    remote = RemoteReward(server.url, timeout=30, api_key="sesame", max_in_flight=8)
    groups = [single_group(s, g=2 + s % 3) for s in range(8)]
    results = [None] * len(groups)

    def score(i):
        results[i] = remote(groups[i])

    threads = [threading.Thread(target=score, args=(i,)) for i in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(same(results[i], local(groups[i])) for i in range(len(groups)))


class _NaNReward(Reward):
    def forward(self, group):
        return RewardOutput(torch.full((group.size,), float("nan")))


@pytest.mark.slow  # four real servers: ~35 s on 2 cores
def test_bad_requests_get_4xx_and_the_worker_keeps_serving(servers):
    server, local = servers["dense"]
    good = encode_group(single_group(1))

    def post(body: bytes, key: str | None = "sesame") -> tuple[int, str]:
        headers = {"Content-Type": "application/json", **({"X-API-Key": key} if key else {})}
        try:
            with urllib.request.urlopen(
                urllib.request.Request(server.url + "/predict", body, headers), timeout=60
            ) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def still_serving():
        status, text = post(json.dumps(good).encode())
        assert status == 200 and same(decode_output(json.loads(text), 4), local(single_group(1)))

    wrong_shape = {**good, "tensors": _with(BASE, images=torch.rand(4, 16, 16))["tensors"]}
    nan_images = {**good, "tensors": _with(BASE, images=torch.full((2, 3, 16, 16), float("nan")))["tensors"]}
    cases = {
        "wrong shape": (json.dumps(wrong_shape).encode(), "sesame", 422, "shape [4, 16, 16]"),
        "NaN images": (json.dumps(nan_images).encode(), "sesame", 422, "NaN or infinite"),
        "unknown field": (json.dumps({**good, "colour": "red"}).encode(), "sesame", 422, "colour: Extra inputs"),
        "not JSON": (b"{not json", "sesame", 422, "JSON decode error"),
        "no API key": (json.dumps(good).encode(), None, 401, "X-API-Key"),
        "wrong API key": (json.dumps(good).encode(), "open", 401, "X-API-Key"),
    }
    got, answer = _oversized(server.port, 200 * 2**20)  # the whole body is never read: 413 on its length
    assert got == 413 and "200 MiB is too large: this server takes 160 MiB" in answer
    still_serving()
    for what, (body, key, status, text) in cases.items():
        got, answer = post(body, key)
        assert (got, text in answer) == (status, True), (what, got, answer[:300])
        assert len(answer) < 2000, what  # a sentence, not the body echoed back
        still_serving()


def _oversized(port: int, size: int) -> tuple[int, str]:
    """Announce a ``size``-byte body, send its first MiB, and read the answer (a client that sent all 200 MB first would
    see the server close the connection instead)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: sesame\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
            + b"x" * 2**20
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


@pytest.mark.slow  # four real servers: ~35 s on 2 cores
def test_client_errors_name_the_server_and_the_fix(servers):
    server, _ = servers["dense"]
    with pytest.raises(RemoteRewardError, match=r"refused the group \(HTTP 401\).*DIVRL_REWARD_API_KEY"):
        RemoteReward(server.url, timeout=30, api_key="wrong")(single_group(0))
    with pytest.raises(RemoteRewardError, match=r"HTTP 422\): GatedReward: .*"):
        group = single_group(0)
        group.sample.masks[0] = Image.new("L", (48, 48))  # an all-black mask: the reward's own refusal
        RemoteReward(server.url, timeout=30, api_key="sesame")(group)


def test_non_finite_rewards_are_skipped_not_zero(monkeypatch):
    remote = RemoteReward("http://127.0.0.1:9", timeout=1)
    monkeypatch.setattr(remote, "_post", lambda url, body: {"non_finite": "nSSM is NaN"})
    with pytest.raises(NonFiniteReward, match="reward server http://127.0.0.1:9/predict: nSSM is NaN"):
        remote(single_group(0))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="init_args.urls must hold http"):
        RemoteReward(["127.0.0.1:8000"])
    with pytest.raises(ValueError, match="init_args.max_in_flight must be an integer >= 1"):
        RemoteReward("http://h:1", max_in_flight=0)
    with pytest.raises(ValueError, match="name a server twice"):
        RemoteReward(["http://h:1", "http://h:1/"])


@pytest.mark.slow  # four real servers: ~35 s on 2 cores
def test_a_served_reward_fails_as_it_would_in_process(servers):
    server, local = servers["callable"]
    remote = RemoteReward(server.url, timeout=30)
    nan, crash = single_group(1), single_group(2)
    nan.sample.prompt, crash.sample.prompt = "nan", "crash"
    with pytest.raises(NonFiniteReward):
        local(nan)
    with pytest.raises(
        NonFiniteReward, match=f"reward server {server.url}/predict: CallableReward returned non-finite"
    ):
        remote(nan)  # skipped and counted in training, as in process
    start = time.monotonic()
    with pytest.raises(
        RemoteRewardError, match=r"HTTP 422\): CallableReward: RuntimeError: shape mismatch in the judge"
    ):
        remote(crash)  # stops the run at once, as in process; not retried on other servers
    assert time.monotonic() - start < 5 and remote.pool.servers[0].failures == 0
    nan_images = single_group(3)
    nan_images.images[1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteReward, match="NaN or infinite values; not sent"):
        remote(nan_images)
    assert same(remote(single_group(4)), local(single_group(4)))


@pytest.mark.slow  # four real servers: ~35 s on 2 cores
def test_a_group_over_the_servers_limit_stops_with_the_fix_not_a_retry_storm(servers):
    server, _ = servers["callable"]
    big = Group(single_group(0).sample, torch.rand(8, 3, 256, 256))  # 6 MiB; the server takes 1 MiB
    start = time.monotonic()
    with pytest.raises(
        RemoteRewardError,
        match=r"takes requests up to 1 MiB and this group's is \d+ MiB: raise the "
        r"servers' --max-request-mb",
    ):
        RemoteReward(server.url, timeout=30, retries=3)(big)
    assert time.monotonic() - start < 10


def test_background_threads_score_with_the_callers_grad_mode():
    from divrl.training.scoring import GroupScoring

    class Slow(Reward):
        concurrency = 3

        def __init__(self):
            super().__init__()
            self.grad = []

        def forward(self, group):
            time.sleep(0.02 * (len(self.grad) % 3))
            self.grad.append(torch.is_grad_enabled())
            return RewardOutput(group.images.mean(dim=(1, 2, 3)))

    reward = Slow()
    with torch.no_grad(), GroupScoring(reward) as scoring:
        for i in range(9):
            scoring.submit(single_group(i, g=2).sample, torch.rand(2, 3, 8, 8))
        results = scoring.results()
    assert reward.grad == [False] * 9 and all(isinstance(r, RewardOutput) for r in results)
