"""Training: optimizer groups, schedules, data order, a short run whose loss falls, exact resume,
NaN skipping and a 2-process torchrun run (segclip/training)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segclip.checkpoint import load_checkpoint
from segclip.config import ModelConfig
from segclip.errors import CheckpointError, ConfigError, DataError
from segclip.model import SegCLIP
from segclip.training import TrainConfig, get_recipe, train
from segclip.training.data import Phase, StepBatchSampler
from segclip.training.optim import build_optimizer, gumbel_tau, lr_factor
from segclip.training.state import capture_rng, load_train_state, restore_rng

# A very small model: 32 px inputs (4x4 grid, so 64 px eval images take 4 windows), width 32.
SMALL = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
             group_layer=1, num_centers=4, text_width=32, text_layers=1, text_heads=2,
             embed_dim=32, decoder_width=32, decoder_layers=1, decoder_heads=2)
SCRATCH = dict(lower_lr_scope="none", freeze_embeddings=False, lr=1e-3, ckpt_every=0,
               log_every=1)


def small_config() -> ModelConfig:
    return ModelConfig.preset("tiny", **SMALL)


def test_reference_groups_and_frozen_parameters() -> None:
    model = SegCLIP(small_config())
    optimizer = build_optimizer(model, TrainConfig())
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    lower = groups["lower_decay"] | groups["lower_no_decay"]
    main = groups["main_decay"] | groups["main_no_decay"]
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in lower  # before the group
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in main  # after the group
    assert {"logit_scale", "text_projection", "ln_final.weight"} <= lower
    assert {"group.centers", "visual.proj", "visual.ln_post.weight"} <= main
    assert any(n.startswith("reconstruction.") for n in main)
    assert all("bias" in n for n in groups["main_no_decay"] | groups["lower_no_decay"])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"visual.class_embedding", "visual.conv1.weight",
                      "visual.positional_embedding", "visual.ln_pre.weight",
                      "visual.ln_pre.bias", "token_embedding.weight", "positional_embedding"}
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["lower_decay"] == 4e-6 and lrs["main_decay"] == 4e-3
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6


def test_scratch_option_trains_everything_at_lr() -> None:
    model = SegCLIP(small_config())
    optimizer = build_optimizer(model, TrainConfig(**SCRATCH))
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"visual.class_embedding"}  # dead: the CLS token is dropped


def test_text_scope_keeps_only_the_text_side_lower() -> None:
    model = SegCLIP(small_config())
    config = TrainConfig(lower_lr_scope="text", freeze_embeddings=False, lower_lr=1e-5)
    optimizer = build_optimizer(model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    lower = {names[id(p)] for g in optimizer.param_groups if g["lr"] == 1e-5 for p in g["params"]}
    assert {"logit_scale", "text_projection", "token_embedding.weight"} <= lower
    assert not any(n.startswith("visual.") for n in lower)
    with pytest.raises(ConfigError, match="lower_lr_scope must be one of"):
        TrainConfig(lower_lr_scope="some")


def test_lr_schedule_warmup_then_half_cosine() -> None:
    total = 100
    factors = [lr_factor(s, total, 0.15) for s in range(total)]
    assert factors[0] == 0.0 and factors[5] == pytest.approx(5 / 15)
    assert factors[15] == pytest.approx(1.0)
    assert factors[15 + 85 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 42 / 85)))
    assert all(a >= b for a, b in zip(factors[15:], factors[16:]))
    assert factors[-1] < 1e-3


def test_gumbel_schedule_is_geometric() -> None:
    config = TrainConfig(gumbel_tau_start=2.0, gumbel_tau_end=0.5)
    assert gumbel_tau(0, 11, config, 0.9) == pytest.approx(2.0)
    assert gumbel_tau(5, 11, config, 0.9) == pytest.approx(1.0)
    assert gumbel_tau(10, 11, config, 0.9) == pytest.approx(0.5)
    assert gumbel_tau(3, 11, TrainConfig(), 0.9) == 0.9


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="warmup must be in"):
        TrainConfig(warmup=1.5)
    with pytest.raises(ConfigError, match="gumbel_tau_start and gumbel_tau_end"):
        TrainConfig(gumbel_tau_start=1.0)
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        get_recipe("nope")
    with pytest.raises(ConfigError, match=r"unknown TrainConfig fields \['bogus'\]"):
        TrainConfig().replace(bogus=1)


def test_sampler_shards_a_global_batch_and_resumes() -> None:
    phases = [Phase(np.arange(7, 17), 3, 1000), Phase(np.arange(40), 6, 0)]
    ranks = [StepBatchSampler(phases, 4, world_size=2, rank=r, seed=1) for r in (0, 1)]
    single = StepBatchSampler(phases, 8, world_size=1, rank=0, seed=1)
    for step in range(9):
        a, b = ranks[0].batch(step), ranks[1].batch(step)
        assert len(a) == len(b) == 4 and not {i for i, _ in a} & {i for i, _ in b}
        assert a + b == single.batch(step)
    assert all(7 <= i < 17 and e == 1002 for i, e in ranks[0].batch(2))  # curriculum epoch 2
    seen = [i for step in range(3, 8) for i, _ in single.batch(step)]  # epoch 0 of phase 2
    assert len(set(seen)) == 40
    resumed = StepBatchSampler(phases, 4, world_size=2, rank=1, seed=1, start=5)
    assert list(resumed) == [ranks[1].batch(s) for s in range(5, 9)]
    with pytest.raises(DataError, match="fewer than one global batch"):
        StepBatchSampler([Phase(np.arange(5), 1, 0)], 4, world_size=2)


def test_rng_state_round_trip() -> None:
    state = capture_rng()
    expected = (torch.rand(3), np.random.rand(2))
    restore_rng(state)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(2),
                                                                      expected[1])


def test_short_run_loss_falls_and_writes_the_contracts(synth_world: Path, tmp_path: Path) -> None:
    config = TrainConfig(steps=30, batch_size=8, warmup=0.1, **SCRATCH)
    result = train(small_config(), config, [synth_world], tmp_path / "run", progress=False)
    losses = [result.losses[s] for s in range(1, 31)]
    assert result.step == 30 and result.skipped == 0
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert {"contrastive", "reconstruction", "superpixel_kl", "lr", "tau"} <= set(records[0])
    assert all(r["logit_scale"] <= 100.0 for r in records)
    model = load_checkpoint(tmp_path / "run/ckpt.pt")
    assert model.config == small_config()
    state = load_train_state(tmp_path / "run/train_state.pt")  # weights_only loadable
    assert state["step"] == 30 and len(state["rng"]) == 1
    with pytest.raises(ConfigError, match="already holds a run"):
        train(small_config(), config, [synth_world], tmp_path / "run", progress=False)


def test_resume_equals_uninterrupted(synth_world: Path, tmp_path: Path) -> None:
    config = TrainConfig(steps=8, batch_size=4, curriculum_steps=2, **SCRATCH)
    whole = train(small_config(), config, [synth_world], tmp_path / "a", progress=False)
    first = train(small_config(), config, [synth_world], tmp_path / "b", progress=False,
                  stop_after=4)
    assert first.step == 4 and load_train_state(tmp_path / "b/train_state.pt")["step"] == 4
    rest = train(None, None, [synth_world], tmp_path / "b", resume=True, progress=False)
    assert sorted(rest.losses) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert abs(rest.losses[step] - whole.losses[step]) < 1e-5
    a = load_checkpoint(tmp_path / "a/ckpt.pt").state_dict()
    b = load_checkpoint(tmp_path / "b/ckpt.pt").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    lines = (tmp_path / "b/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))
    with pytest.raises(ConfigError, match="different training config"):
        train(small_config(), config.replace(lr=0.5), [synth_world], tmp_path / "b",
              resume=True, progress=False)
    with pytest.raises(CheckpointError, match="not found"):
        train(None, None, [synth_world], tmp_path / "none", resume=True, progress=False)


def test_non_finite_steps_are_skipped(synth_world: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    forward = SegCLIP.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        terms = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(SegCLIP, "forward", poisoned)
    config = TrainConfig(steps=3, batch_size=4, superpixel_kl_weight=0.0, **SCRATCH)
    result = train(small_config(), config, [synth_world], tmp_path / "run", progress=False)
    assert result.skipped == 1 and result.step == 3
    assert math.isnan(result.losses[2]) and math.isfinite(result.losses[3])
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "run/ckpt.pt")
               .state_dict().values())


def test_amp_bf16_on_cpu(synth_world: Path, tmp_path: Path) -> None:
    config = TrainConfig(steps=2, batch_size=4, amp=True, **SCRATCH)
    result = train(small_config(), config, [synth_world], tmp_path / "run", progress=False)
    assert result.skipped == 0 and all(math.isfinite(v) for v in result.losses.values())
    weights = load_checkpoint(tmp_path / "run/ckpt.pt").state_dict()
    assert all(v.dtype != torch.bfloat16 for v in weights.values())  # weights stay fp32


def test_torchrun_two_processes(synth_world: Path, tmp_path: Path) -> None:
    sets = [item for k, v in SMALL.items() for item in ("--model-set", f"{k}={v}")]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(29500 + os.getpid() % 500), "-m", "segclip.cli.train",
               "--config", "tiny", "--recipe", "synth", "--data", str(synth_world),
               "--out", str(tmp_path / "ddp"), "--steps", "3", "--batch-size", "4",
               "--log-every", "1", "--quiet", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote") == 1  # rank 0 only
    records = [json.loads(line) for line in (tmp_path / "ddp/metrics.jsonl").read_text()
               .splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records)
    state = load_train_state(tmp_path / "ddp/train_state.pt")
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"],
                                                      state["rng"][1]["torch"])
    assert load_checkpoint(tmp_path / "ddp/ckpt.pt").config.image_size == 32


def test_colour_groups_and_object_captions_train(synth_world: Path, tmp_path: Path) -> None:
    config = TrainConfig(steps=3, batch_size=8, colour_groups=4, captions="objects", **SCRATCH)
    run = train(small_config(), config, [synth_world], tmp_path / "run", progress=False)
    assert sorted(run.losses) == [1, 2, 3] and all(math.isfinite(v) for v in run.losses.values())
    stored = load_train_state(tmp_path / "run/train_state.pt")["train_config"]
    assert stored["colour_groups"] == 4 and stored["captions"] == "objects"
