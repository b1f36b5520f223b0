"""The training loop (paper §3.2; docs/official-implementation.md §3): `train(...)` is what
`segclip-train` calls.

Per step: set the lr (warmup + half-cosine) and the Gumbel temperature, forward the weighted
losses (optionally under autocast), skip the step on every rank if any rank's loss is not finite,
backward, clip the global gradient norm to 1.0 (a non-finite norm also skips the step), AdamW,
clamp the logit scale. Every `ckpt_every` steps and at the end: `RUN/train_state.pt`
(`segclip.training.state`), then `RUN/ckpt.pt` (the checkpoint contract, full model), both atomic,
the previous state kept until the new pair is complete; every
`log_every` steps a line of `RUN/metrics.jsonl`. `resume=True` continues a run exactly: same
data order (`segclip.training.data`), schedule, optimizer state and RNG streams.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from segclip.checkpoint import (
    config_from_payload,
    load_payload_weights,
    read_checkpoint,
    save_checkpoint,
)
from segclip.config import ModelConfig
from segclip.data.pairs import PairDataset, PairsConfig
from segclip.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MissingDependencyError,
    SegclipError,
    WriteError,
)
from segclip.evaluation.datasets import load_classes
from segclip.model import LossWeights, SegCLIP
from segclip.training.config import TrainConfig
from segclip.training.data import StepBatchSampler, object_captions, plan_phases
from segclip.training.distributed import (
    DistInfo,
    all_true,
    barrier,
    gather_objects,
    init_distributed,
    mean_over_ranks,
    shutdown,
)
from segclip.training.names import NameTargets
from segclip.training.optim import build_optimizer, gumbel_tau, lr_factor, set_lr
from segclip.training.state import (
    CKPT_FILE,
    KEPT_STATE_GLOB,
    METRICS_FILE,
    STATE_FILE,
    capture_rng,
    kept_state_file,
    load_train_state,
    restore_rng,
    save_train_state,
)


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # steps completed
    total_steps: int
    skipped: int  # steps skipped for a non-finite loss or gradient norm
    elapsed: float  # seconds of training, summed over resumes
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> local loss
    rank: int = 0  # this process's rank (only rank 0 writes files)


@dataclass
class _Run:
    """Everything a run holds while it trains."""

    info: DistInfo
    out: Path
    model_config: ModelConfig
    config: TrainConfig
    data: list[str]
    model: torch.nn.Module  # DDP-wrapped when distributed
    core: SegCLIP
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler | None
    sampler: StepBatchSampler
    loader: DataLoader
    step: int
    skipped: int
    elapsed: float
    recipe: str
    saved_step: int | None  # the step of the ckpt.pt on disk (None before the first save)
    names: NameTargets | None = None  # the names loss's prompts and mentions


def train(model_config: ModelConfig | None, config: TrainConfig | None,
          data: Sequence[str | Path], out: str | Path, *, resume: bool = False,
          clip_weights: str | Path | None = None, stop_after: int | None = None,
          progress: bool = True, device: str | None = None, recipe: str = "") -> TrainResult:
    """Train SegCLIP on image-caption pairs and write `out/ckpt.pt`.

    Args:
        model_config, config: the run's configs; on `resume` they may be None (the stored ones
            are used) and must otherwise equal the stored ones.
        data: pair sources (`segclip.data.pairs.PairDataset`); on `resume` empty means the
            run's own.
        stop_after: stop (with a checkpoint) after this many steps in total: an interruption
            that `resume=True` continues from.
    """
    info = init_distributed(device)
    try:
        run = _setup(info, model_config, config, data, Path(out), resume, clip_weights, recipe)
        return _loop(run, stop_after, progress)
    finally:
        shutdown(info)


def _resume_files(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint of `out` and the train state of the same step."""
    ckpt = out / CKPT_FILE
    if not ckpt.is_file():
        raise CheckpointError(f"cannot resume: {ckpt} not found (was the run started with this "
                              "--out? A run stopped before its first checkpoint has nothing to "
                              "resume: start it again in a new --out)")
    payload = read_checkpoint(ckpt)
    step = payload["meta"].get("step")
    kept = kept_state_file(out, step) if isinstance(step, int) else None
    state_path = kept if kept is not None and kept.is_file() else out / STATE_FILE
    state = load_train_state(state_path)
    if step != state["step"]:
        raise CheckpointError(f"cannot resume: {ckpt} is at step {step} but {state_path} at "
                              f"step {state['step']}; they are not from the same save")
    return payload, state


def _stored_configs(out: Path, state: dict[str, Any], model_config: ModelConfig | None,
                    config: TrainConfig | None) -> tuple[ModelConfig, TrainConfig]:
    """The run's configs; given ones must equal them."""
    try:
        stored_model = ModelConfig.from_dict(state["model_config"])
        stored_train = TrainConfig.from_dict(state["train_config"])
    except (ConfigError, TypeError, KeyError) as e:
        raise CheckpointError(f"cannot resume: the train state in {out} holds an invalid "
                              f"config ({e})") from e
    for given, stored, what in ((model_config, stored_model, "model"),
                                (config, stored_train, "training")):
        if given is not None and given != stored:
            changed = sorted(k for k, v in given.to_dict().items() if stored.to_dict()[k] != v)
            raise ConfigError(f"--resume with a different {what} config than the run in {out} "
                              f"(fields {changed}); resume with the original options")
    return stored_model, stored_train


def _check_out_dir(out: Path) -> None:
    """Refuse an --out that is a file or lies under one (before anything is read or written)."""
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker == out and not out.is_dir():
        raise WriteError(f"--out {out} is a file, not a run folder; choose another --out")
    if blocker is not None and not blocker.is_dir():
        raise WriteError(f"--out {out} lies under {blocker}, which is a file, not a folder; "
                         "choose another --out")


def _setup(info: DistInfo, model_config: ModelConfig | None, config: TrainConfig | None,
           data: Sequence[str | Path], out: Path, resume: bool,
           clip_weights: str | Path | None, recipe: str) -> _Run:
    _check_out_dir(out)
    payload: dict[str, Any] = {}
    state: dict[str, Any] | None = None
    if resume:
        payload, state = _resume_files(out)
        model_config, config = _stored_configs(out, state, model_config, config)
        data = data or state["data"]
    elif (out / CKPT_FILE).exists() or (out / STATE_FILE).exists():
        raise ConfigError(f"{out} already holds a run ({CKPT_FILE}); pass --resume to continue "
                          "it or choose another --out")
    if model_config is None or config is None:
        raise ConfigError("model_config and config are required unless resuming")
    if not data:
        raise ConfigError("no training data given (--data)")
    torch.manual_seed(config.seed)  # identical initialisation on every rank
    model = SegCLIP(model_config)
    if clip_weights is not None and state is None:
        _load_clip_weights(model, clip_weights)
    _seed_process(config.seed, info.rank)
    dataset = PairDataset([str(d) for d in data], PairsConfig(
        image_size=model_config.image_size, patch_size=model_config.patch_size,
        context_length=model_config.train_context_length, seed=config.seed,
        superpixels=config.superpixel_kl_weight > 0))
    if config.captions == "objects":
        object_captions(dataset)
    names = (NameTargets.build([dataset.caption(i) for i in range(len(dataset))],
                               load_classes(config.names).names,
                               model_config.train_context_length, device=info.device)
             if config.names_weight > 0 or config.names_flat_weight > 0 else None)
    phases = plan_phases(dataset, config.steps, config.epochs, config.curriculum_steps,
                         config.batch_size, info.world_size, config.colour_groups)
    optimizer = build_optimizer(model, config)
    step, skipped, elapsed = 0, 0, 0.0
    if state is not None:
        step, skipped, elapsed, stored_recipe = _restore(out, payload, state, model, info)
        recipe = recipe or stored_recipe
    model.to(info.device)
    if state is not None:  # optimizer tensors follow the parameters' device
        optimizer.load_state_dict(state["optimizer"])
    scaler = (torch.amp.GradScaler("cuda") if config.amp and info.device.type == "cuda"
              else None)
    if scaler is not None and state is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    sampler = StepBatchSampler(phases, config.batch_size, info.world_size, info.rank,
                               config.seed, start=step)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                        generator=torch.Generator().manual_seed(config.seed),
                        persistent_workers=False)
    wrapped: torch.nn.Module = model
    if info.enabled:
        weights = (config.contrastive_weight, config.reconstruction_weight,
                   config.superpixel_kl_weight)  # the names loss adds no parameters of its own
        wrapped = DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=any(w == 0 for w in weights))
    out.mkdir(parents=True, exist_ok=True)
    _truncate_metrics(out / METRICS_FILE, step, info)
    return _Run(info, out, model_config, config, [str(d) for d in data], wrapped, model,
                optimizer, scaler, sampler, loader, step, skipped, elapsed, recipe,
                step if state is not None else None, names)


def _seed_process(seed: int, rank: int) -> None:
    """Per-rank streams for Gumbel noise and masks (ranks must not draw the same noise)."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    import random

    random.seed(seed + rank)


def _load_clip_weights(model: SegCLIP, path: str | Path) -> None:
    try:
        from segclip.convert import load_clip_weights
    except ImportError as e:
        raise MissingDependencyError(f"--clip-weights needs segclip.convert, which is not "
                                     f"available in this install ({e})") from e
    load_clip_weights(model, path)


def _restore(out: Path, payload: dict[str, Any], state: dict[str, Any], model: SegCLIP,
             info: DistInfo) -> tuple[int, int, float, str]:
    """Load the checkpoint's weights and this rank's RNG streams; (step, skipped, elapsed,
    recipe)."""
    ckpt = out / CKPT_FILE
    if config_from_payload(payload, ckpt) != model.config:
        raise CheckpointError(f"cannot resume: {ckpt} holds another model config than the run's "
                              f"train state in {out}")
    load_payload_weights(model, payload, ckpt)
    rng = state["rng"]
    if len(rng) != info.world_size:
        raise CheckpointError(f"cannot resume: the run used {len(rng)} processes, this one "
                              f"{info.world_size}; resume with the same --nproc_per_node")
    restore_rng(rng[info.rank])
    return (int(state["step"]), int(state["skipped"]), float(state["elapsed"]),
            str(payload["meta"].get("recipe", "")))


def _truncate_metrics(path: Path, step: int, info: DistInfo) -> None:
    """Drop metric lines past `step` (logged after the checkpoint a resumed run restarts from)."""
    if not info.is_main or not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(f"{line}\n" for line in keep))


def _autocast(run: _Run) -> contextlib.AbstractContextManager:
    if not run.config.amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if run.info.device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=run.info.device.type, dtype=dtype)


def _step(run: _Run, batch: dict[str, torch.Tensor], weights: LossWeights,
          ) -> tuple[dict[str, float], float | None]:
    """One optimisation step; returns (loss terms, grad norm or None when skipped)."""
    device = run.info.device
    images = batch["image"].to(device, non_blocking=True)
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["patch_labels"].to(device) if "patch_labels" in batch else None
    names = None
    if run.names is not None:
        names = (run.names.tokens, run.names.targets[batch["index"]].to(device))
    with _autocast(run):
        terms = run.model(images, tokens, labels, weights=weights, names=names)
    loss = terms["loss"]
    values = {k: float(v.detach()) for k, v in terms.items()}
    run.optimizer.zero_grad(set_to_none=True)
    if not all_true(bool(torch.isfinite(loss)), run.info):
        return values, None
    (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    clip = run.config.grad_clip if run.config.grad_clip > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    if run.scaler is not None:
        run.scaler.step(run.optimizer)  # skips itself on inf/NaN gradients
        run.scaler.update()
    elif math.isfinite(norm):
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(norm):
        return values, None
    run.core.clamp_logit_scale()
    return values, norm


def _loop(run: _Run, stop_after: int | None, progress: bool) -> TrainResult:
    config, total = run.config, run.sampler.total
    stop = total if stop_after is None else min(stop_after, total)
    weights = LossWeights(config.contrastive_weight, config.reconstruction_weight,
                          config.superpixel_kl_weight, config.names_weight,
                          config.names_flat_weight)
    result = TrainResult(run.out, run.step, total, run.skipped, run.elapsed,
                         rank=run.info.rank)
    run.model.train()
    bar = tqdm(total=total, initial=run.step, desc="train", unit="step",
               disable=not (progress and run.info.is_main), dynamic_ncols=True)
    default_tau = run.model_config.gumbel_tau
    started, window_start, window_steps = time.perf_counter(), time.perf_counter(), 0
    batches = iter(run.loader)
    while run.step < stop:
        lr = set_lr(run.optimizer, lr_factor(run.step, total, config.warmup))
        tau = gumbel_tau(run.step, total, config, default_tau)
        run.core.group.gumbel_tau = tau
        values, norm = _step(run, _next_batch(batches), weights)
        run.step += 1
        window_steps += 1
        if norm is None:
            run.skipped += 1
        result.losses[run.step] = values["loss"]
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        if run.step % config.log_every == 0 or run.step == stop:
            now = time.perf_counter()
            rate = window_steps * config.batch_size * run.info.world_size / (now - window_start)
            _log(run, values, lr, tau, norm, run.elapsed + now - started, rate)
            window_start, window_steps = now, 0
        if (config.ckpt_every and run.step % config.ckpt_every == 0) or run.step == stop:
            _save(run, run.elapsed + time.perf_counter() - started)
    bar.close()
    result.step, result.skipped = run.step, run.skipped
    result.elapsed = run.elapsed + time.perf_counter() - started
    return result


def _log(run: _Run, values: dict[str, float], lr: float, tau: float, norm: float | None,
         elapsed: float, rate: float) -> None:
    values = mean_over_ranks(values, run.info)
    if not run.info.is_main:
        return
    record = {"step": run.step, "epoch": round(run.sampler.epoch(run.step - 1), 4), "lr": lr,
              "tau": tau, **values, "grad_norm": norm,
              "logit_scale": float(run.core.scale().detach()), "skipped": run.skipped,
              "elapsed": round(elapsed, 3), "samples_per_s": round(rate, 2)}
    with open(run.out / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _next_batch(batches: Any) -> dict[str, torch.Tensor]:
    """The next batch; a user error raised in a DataLoader worker becomes a one-line DataError
    (torch re-raises it with the worker's traceback text in the message)."""
    try:
        return next(batches)
    except SegclipError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if len(lines) <= 1:
            raise
        last = lines[-1]
        name, sep, message = last.partition(": ")
        raise DataError(message if sep and name.split(".")[-1].endswith("Error") else last
                        ) from e


def _keep_state(run: _Run) -> None:
    """Keep the state matching the ckpt.pt on disk as `train_state-STEP.pt` (a hard link where
    possible) until the new pair is complete."""
    if run.saved_step is None:
        return
    kept, current = kept_state_file(run.out, run.saved_step), run.out / STATE_FILE
    if kept.exists() or not current.is_file():
        return
    try:
        os.link(current, kept)
    except OSError:
        os.replace(current, kept)


def _save(run: _Run, elapsed: float) -> None:
    """Write train_state.pt, then ckpt.pt: after a kill at any moment, ckpt.pt and a state of
    its step (train_state.pt or the kept one) are on disk."""
    rng = gather_objects(capture_rng(), run.info)  # collective: every rank takes part
    if run.info.is_main:
        meta = {"step": run.step, "total_steps": run.sampler.total, "recipe": run.recipe,
                "train_config": run.config.to_dict(), "skipped": run.skipped,
                "elapsed": round(elapsed, 3), "world_size": run.info.world_size}
        _keep_state(run)
        save_train_state(run.out / STATE_FILE, step=run.step, optimizer=run.optimizer,
                         scaler=run.scaler, rng=rng, train_config=run.config.to_dict(),
                         model_config=run.model_config.to_dict(), data=run.data,
                         skipped=run.skipped, elapsed=elapsed)
        save_checkpoint(run.core, run.out / CKPT_FILE, meta=meta)
        for stale in run.out.glob(KEPT_STATE_GLOB):
            stale.unlink(missing_ok=True)
    run.saved_step = run.step
    barrier(run.info)
