"""Bad values during training: non-finite rewards skip their group, non-finite losses skip their update; both are
counted, neither is ever applied or turned into a reward of 0."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import divrl.objectives.grpo as grpo_mod
from divrl.data import IdentityDataModule
from divrl.objectives import GRPOObjective, SamplingConfig
from divrl.policy import KontextConfig, LoRAConfig, PolicyConfig
from divrl.rewards import FeatureScorer, NSSMReward
from divrl.rewards.backbones import DenseDescriptor
from divrl.rewards.base import Components, GroupScorer
from divrl.training import DivRLModule, SystemConfig
from divrl.training.trainer import DivRLTrainer

SHARDS = str(Path(__file__).resolve().parents[1] / "data" / "demo" / "train-*.tar")


class FlakyScorer(GroupScorer):
    """A real scorer whose every other group comes back NaN (a broken reward server, a degenerate image)."""

    def __init__(self):
        super().__init__()
        self.inner = FeatureScorer(DenseDescriptor(grid_size=12, cell=4), pool=1)
        self.calls = 0

    def score_group(self, reference, images, ref_mask=None, gen_masks=None, *, need_nssm=True, need_vsm=True):
        self.calls += 1
        out = self.inner.score_group(reference, images, ref_mask, gen_masks, need_nssm=need_nssm, need_vsm=need_vsm)
        if self.calls % 2 == 0:
            return Components(torch.full_like(out.nssm, float("nan")), out.vsm)
        return out


class NaNScorer(GroupScorer):
    """A scorer that returns NaN for every group (a reward server gone wrong)."""

    def score_group(self, reference, images, ref_mask=None, gen_masks=None, *, need_nssm=True, need_vsm=True):
        return Components(torch.full((len(images),), float("nan")), None)


def run(
    reward, max_steps: int, callbacks=(), max_epochs: int | None = None, steps_per_epoch: int = 10, **system
) -> tuple[DivRLModule, DivRLTrainer]:
    torch.manual_seed(0)
    model = DivRLModule(
        KontextConfig(model="tiny", lora=LoRAConfig(rank=4, alpha=8.0), max_sequence_length=32),
        [reward],
        GRPOObjective(micro_batch_size=4),
        SamplingConfig(group_size=4, num_steps=3, resolution=32, val_group_size=2),
        SystemConfig(**system),
    )
    data = IdentityDataModule(SHARDS, batch_size=2, steps_per_epoch=steps_per_epoch)
    trainer = DivRLTrainer(
        accelerator="cpu",
        max_steps=max_steps,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    trainer.fit(model, data)
    return model, trainer


def lora(model: DivRLModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.policy.lora_state_dict().items()}


def test_a_group_with_non_finite_rewards_is_skipped_and_counted(caplog):
    model, trainer = run(NSSMReward(FlakyScorer(), track_vsm=False), max_steps=2)
    assert trainer.global_step == 2  # the finite group of each batch still trained
    assert model.counters["skipped_groups"] == 2
    assert "skipping group" in caplog.text and "non-finite nssm" in caplog.text


def test_a_reward_configuration_error_stops_the_run_at_the_first_step_with_its_message():
    """pool 5 on a 12×12 feature grid: a configuration error, not a non-finite score. The run stops at once with the
    reward's own message, naming the pool and the grid (not the identity's mask, which it once blamed), instead of
    skipping every group until max_steps (what it did when every ValueError counted as a non-finite reward)."""
    snapshot = Snapshot()
    reward = NSSMReward(FeatureScorer(DenseDescriptor(grid_size=12, cell=4), pool=5), track_vsm=False)
    with pytest.raises(ValueError, match=r"pool=5 does not divide the backbone's 12x12 feature grid"):
        run(reward, max_steps=5, callbacks=[snapshot])
    assert len(snapshot.states) == 1  # stopped inside the first training step: no update was ever applied


def test_a_reward_that_is_never_finite_stops_after_the_configured_number_of_empty_rollouts():
    snapshot = Snapshot()
    with pytest.raises(RuntimeError, match=r"3 rollouts in a row had no group with a finite reward \(NSSMReward"):
        run(NSSMReward(NaNScorer(), track_vsm=False), max_steps=50, callbacks=[snapshot], max_empty_rollouts=3)
    before, *after = snapshot.states
    assert len(after) == 2 and all(torch.equal(before[k], a[k]) for a in after for k in before)  # never applied


def test_a_run_whose_every_rollout_was_skipped_fails_at_the_end_and_skips_are_summarised(caplog):
    """A run that ends (one epoch of 3 rollouts) before system.max_empty_rollouts (10) with every rollout skipped
    must not exit as a success; a run that skipped some groups says how many when it ends."""
    with pytest.raises(
        RuntimeError,
        match=r"every one of the run's 3 rollouts was skipped \(the last had no group with a "
        r"finite reward \(NSSMReward",
    ):
        run(NSSMReward(NaNScorer(), track_vsm=False), max_steps=-1, max_epochs=1, steps_per_epoch=3)
    caplog.clear()
    run(NSSMReward(FlakyScorer(), track_vsm=False), max_steps=2)
    assert "2 groups skipped (non-finite reward)" in caplog.text


class Snapshot(pl.Callback):
    def __init__(self):
        self.states = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.states:
            self.states.append(lora(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append(lora(pl_module))


def test_a_non_finite_loss_skips_the_update_and_never_applies_it(monkeypatch):
    real = grpo_mod.grpo_loss
    calls = {"n": 0}

    def first_call_nan(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 1 else loss), stats

    monkeypatch.setattr(grpo_mod, "grpo_loss", first_call_nan)
    snapshot = Snapshot()
    reward = NSSMReward(FeatureScorer(DenseDescriptor(grid_size=12, cell=4), pool=1))
    model, trainer = run(reward, max_steps=1, callbacks=[snapshot])
    assert model.counters["skipped_updates"] == 1 and model.rollouts_done == 2 and trainer.global_step == 1
    before, after_skip, after_update = snapshot.states
    assert all(torch.equal(before[k], after_skip[k]) for k in before)  # nothing of the NaN update was applied
    assert any(not torch.equal(before[k], after_update[k]) for k in before)


def test_many_non_finite_updates_in_a_row_stop_the_run(monkeypatch):
    monkeypatch.setattr(grpo_mod, "grpo_loss", lambda log_prob, *a, **k: (log_prob.mean() * float("nan"), {}))
    reward = NSSMReward(FeatureScorer(DenseDescriptor(grid_size=12, cell=4), pool=1))
    with pytest.raises(FloatingPointError, match="10 updates in a row"):
        run(reward, max_steps=1)


def test_attention_backends_are_validated_and_restrict_sdpa():
    with pytest.raises(ValueError, match=r"unknown \['flashy'\]"):
        PolicyConfig(model="tiny", sdpa_backends=["flashy"]).attention()
    q = torch.randn(1, 1, 4, 8)
    with PolicyConfig(model="tiny", sdpa_backends=["math"]).attention():
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert torch.allclose(out, torch.softmax(q @ q.transpose(-1, -2) / 8**0.5, -1) @ q, atol=1e-6)
    with PolicyConfig(model="tiny", sdpa_backends=["cudnn"]).attention(), pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # no cuDNN kernel on a CPU tensor: restricted


def test_adapter_ema_follows_the_recurrence_and_is_what_gets_exported(tmp_path):
    from safetensors.torch import load_file

    from divrl.training import AdapterEMA, LoRAExporter

    snapshot, ema = Snapshot(), AdapterEMA(decay=0.5, every_n_steps=2, warmup=False)
    reward = NSSMReward(FeatureScorer(DenseDescriptor(grid_size=12, cell=4), pool=1))
    model, trainer = run(reward, max_steps=4, callbacks=[snapshot, ema])
    states = snapshot.states  # before training, then after each of the 4 updates
    expected = {k: v.clone() for k, v in states[0].items()}
    for step in (2, 4):  # every 2 optimizer steps: ema += (1 - 0.5) (theta - ema)
        for k in expected:
            expected[k] += 0.5 * (states[step][k] - expected[k])
    names = {n.split("transformer.", 1)[1].replace(".default", ""): n for n in ema.shadow}
    for key, value in expected.items():
        assert torch.allclose(ema.shadow[names[key]].cpu(), value, atol=1e-7), key
    assert any(not torch.equal(expected[k], states[4][k]) for k in expected)  # the average lags the weights

    exporter = LoRAExporter()
    trainer.callbacks.append(exporter)
    trainer._default_root_dir = str(tmp_path)  # export into the test folder
    path = exporter.export(trainer, model, "final")
    exported = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    assert all(torch.allclose(exported[k], expected[k], atol=1e-7) for k in expected)
    assert all(torch.equal(model.policy.lora_state_dict()[k], states[4][k]) for k in expected)  # raw weights restored


def test_sft_on_shards_without_targets_stops_after_the_configured_number_of_empty_batches(tmp_path):
    """Shards written without --targets give SFT nothing to learn from: no update is applied (not a loss of 0 with
    AdamW's weight decay still moving the adapter), and the run stops naming what the shards lack."""
    from divrl.data.synthetic import synthetic_records, write_shards
    from divrl.objectives import SFTObjective

    shards = write_shards(synthetic_records(4, size=32), tmp_path / "shards", name="train")
    model = DivRLModule(
        KontextConfig(model="tiny", lora=LoRAConfig(rank=4, alpha=8.0), max_sequence_length=32),
        [NSSMReward(FeatureScorer(DenseDescriptor(grid_size=12, cell=4), pool=2), track_vsm=False)],
        SFTObjective(),
        SamplingConfig(group_size=2, num_steps=3, resolution=32, val_group_size=2),
        SystemConfig(max_empty_rollouts=2),
    )
    snapshot = Snapshot()
    trainer = DivRLTrainer(
        accelerator="cpu",
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[snapshot],
    )
    with pytest.raises(RuntimeError, match=r"2 rollouts in a row had no condition with a target image.*--targets"):
        trainer.fit(model, IdentityDataModule([str(p) for p in shards], batch_size=2, steps_per_epoch=5))
    before, *after = snapshot.states
    assert after and all(torch.equal(before[k], a[k]) for a in after for k in before)  # never applied
    assert model.counters["empty_rollouts"] == 2
