"""Several references per condition in KontextPolicy (`policy.reference_positions`): position ids against hand-built
tensors, one reference unchanged, every reference's tokens in the transformer call, the precomputed payload equal to
encoding, and a batch that mixes reference counts refused."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from divrl.data.schema import IdentityRecord
from divrl.data.stream import ConditionSample
from divrl.policy import KontextConfig, KontextPolicy, LoRAConfig
from divrl.policy.kontext.encoder import reference_ids

LORA = LoRAConfig(rank=4, alpha=8.0)


def grid(rows: int, cols: int) -> torch.Tensor:
    """FLUX's latent ids of a rows × cols packed grid: (0, row, column), row-major (written out, not diffusers')."""
    return torch.tensor([[0.0, r, c] for r in range(rows) for c in range(cols)])


def test_position_ids_of_two_and_three_references_equal_hand_built_tensors():
    latent = grid(2, 3)
    frame = reference_ids(latent, 3, "frame", 3)
    expected = torch.tensor([[i, r, c] for i in (1, 2, 3) for r in range(2) for c in range(3)], dtype=torch.float)
    assert torch.equal(frame, expected)
    stitch = reference_ids(latent, 2, "stitch", 3)
    expected = torch.tensor([[1, r, c + 3 * i] for i in (0, 1) for r in range(2) for c in range(3)], dtype=torch.float)
    assert torch.equal(stitch, expected)
    for positions in ("frame", "stitch"):  # one reference: FLUX.1 Kontext's own ids, frame 1
        assert torch.equal(reference_ids(latent, 1, positions, 3), torch.cat([torch.ones(6, 1), latent[:, 1:]], 1))
    with pytest.raises(ValueError, match="reference_positions: 'tiled' is not one of"):
        reference_ids(latent, 2, "tiled", 3)


def pictures(n: int) -> list[torch.Tensor]:
    return [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(k)) for k in range(n)]


@pytest.fixture(scope="module")
def policies():
    moved = {}
    for positions in ("frame", "stitch"):
        policy = KontextPolicy.tiny(0, lora=LORA, reference_positions=positions)
        with torch.no_grad():
            for name, p in policy.transformer.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        moved[positions] = policy
    return moved


def test_one_reference_is_conditioned_exactly_as_before(policies):
    frame, stitch = policies["frame"], policies["stitch"]
    ref = pictures(1)[0]
    single = frame.condition(ref, "a photo", 32, 32, group_size=2)
    listed = stitch.condition([[ref]], ["a photo"], 32, 32, group_size=2)
    latent_h, latent_w = frame.latent_grid(32, 32)
    latent = grid(latent_h // 2, latent_w // 2)
    own = torch.cat([latent, torch.cat([torch.ones(len(latent), 1), latent[:, 1:]], 1)])  # FLUX.1 Kontext's ids
    assert torch.equal(single.img_ids, own) and torch.equal(listed.img_ids, own)
    assert torch.equal(single.image_latents, listed.image_latents)
    x = frame.initial_noise(single, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(frame.velocity(x, 0.5, single), frame.velocity(x, 0.5, listed))


def test_every_reference_enters_the_transformer_call(policies):
    policy = policies["frame"]
    first, second = pictures(2)
    both = policy.condition([[first, second]], ["a photo of both"], 32, 32, group_size=2)
    alone = policy.condition([[first]], ["a photo of both"], 32, 32, group_size=2)
    tokens = alone.image_latents.shape[1]
    assert both.image_latents.shape[1] == 2 * tokens and both.img_ids.shape[0] == both.num_tokens + 2 * tokens
    assert torch.equal(both.image_latents[:, :tokens], alone.image_latents)
    assert torch.equal(both.image_latents[:, tokens:], policy.encode_reference(second, 32, 32).expand(2, -1, -1))
    assert torch.equal(both.img_ids[both.num_tokens + tokens :, 0], torch.full((tokens,), 2.0))  # frame 2
    assert policy.flops_per_call(both) > policy.flops_per_call(alone)  # the second reference's tokens are counted
    x = policy.initial_noise(both, torch.Generator().manual_seed(0))
    with torch.no_grad():
        v2, v1 = policy.velocity(x, 0.5, both), policy.velocity(x, 0.5, alone)
    assert v2.shape == x.shape and (v2 - v1).abs().max() > 1e-4  # the output is cut back to the noisy tokens
    stitched = policies["stitch"].condition([[first, second]], ["a photo of both"], 32, 32)
    assert not torch.equal(stitched.img_ids, both.img_ids)  # another placement


def test_a_precomputed_payload_of_two_references_equals_encoding(policies):
    policy = policies["frame"]
    references = [Image.fromarray((p.permute(1, 2, 0).numpy() * 255).astype("uint8")) for p in pictures(2)]
    record = IdentityRecord("pair", references, ["a photo of both", "a sketch of both"])
    payload = policy.precompute(record, 32)
    assert payload["image_latents"].shape[0] == 2
    sample = ConditionSample("pair", "a sketch of both", references, prompt_index=1)
    encoded = policy.encode([sample], 32, 32, group_size=2)
    policy.clear_caches()
    sample.conditioning = payload
    read = policy.encode([sample], 32, 32, group_size=2)
    assert torch.equal(read.image_latents, encoded.image_latents) and torch.equal(read.img_ids, encoded.img_ids)
    torch.testing.assert_close(read.prompt_embeds, encoded.prompt_embeds)


def test_a_batch_mixing_reference_counts_is_refused(policies):
    one, two = pictures(2)
    image = [Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 200, 0))]
    samples = [ConditionSample("solo", "a photo", image[:1]), ConditionSample("duo", "a photo", image)]
    with pytest.raises(ValueError, match=r"one batch have \[1, 2\] references \(solo: 1, duo: 2\)"):
        policies["frame"].encode(samples, 32, 32)
    with pytest.raises(ValueError, match=r"the prompts of one batch have \[1, 2\] references"):
        policies["frame"].condition([[one], [one, two]], ["a", "b"], 32, 32)
    assert KontextConfig(model="tiny", reference_positions="stitch").build().reference_positions == "stitch"
