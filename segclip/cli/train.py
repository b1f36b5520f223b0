"""`segclip-train`: train SegCLIP on image-caption pairs (docs/architecture.md "Command contracts").

    segclip-train --config tiny --recipe synth --data DATA --out RUN
    torchrun --nproc_per_node 2 -m segclip.cli.train --config tiny --data DATA --out RUN
    segclip-train --out RUN --resume

`--set FIELD=VALUE` overrides any `TrainConfig` field and `--model-set FIELD=VALUE` any
`ModelConfig` field (values are JSON: 0.5, true, null; anything else is a string).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from segclip.cli._exit import fail, new_app
from segclip.errors import ConfigError, SegclipError

app = new_app(help="Train SegCLIP (paper §3.2).")


def parse_assignments(items: list[str], option: str) -> dict[str, Any]:
    """['a=1', 'b=true', 'c=x'] -> {'a': 1, 'b': True, 'c': 'x'}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} expects FIELD=VALUE, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = raw
    return out


def build_configs(config: str | None, recipe: str | None, overrides: dict[str, Any],
                  model_overrides: dict[str, Any]):
    """(ModelConfig, TrainConfig, recipe name) from a preset, a recipe and overrides."""
    from dataclasses import fields

    from segclip.config import ModelConfig
    from segclip.training.config import get_recipe

    if config is None:
        raise ConfigError("--config is required (tiny or vit-b16) unless --resume")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(model_overrides) - known)
    if unknown:
        raise ConfigError(f"--model-set: unknown ModelConfig fields {unknown}; known: "
                          f"{sorted(known)}")
    chosen = get_recipe(recipe or "paper")
    model_config = ModelConfig.preset(config, **{**chosen.model, **model_overrides})
    return model_config, chosen.train.replace(**overrides), chosen.name


@app.command()
def main(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: ckpt.pt, train_state.pt, "
                                      "metrics.jsonl.")],
    data: Annotated[Optional[list[Path]], typer.Option(
        "--data", help="pairs.jsonl, CSV/TSV, COCO JSON, .tar shards or a folder; repeatable "
        "[default on --resume: the run's].")] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="Model preset: tiny or "
                                                  "vit-b16.")] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="Training recipe: paper "
                                                  "(default) or synth.")] = None,
    clip_weights: Annotated[Optional[Path], typer.Option(
        "--clip-weights", help="Initialise from an OpenAI/open_clip ViT-B/16 file.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out.")] = False,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Total steps.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs (if no --steps).")
                      ] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Per process.")
                          ] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="bf16 (CPU) / fp16 "
                                                "(CUDA) autocast.")] = None,
    ckpt_every: Annotated[Optional[int], typer.Option("--ckpt-every")] = None,
    log_every: Annotated[Optional[int], typer.Option("--log-every")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="DataLoader workers.")
                       ] = None,
    sets: Annotated[Optional[list[str]], typer.Option(
        "--set", help="TrainConfig FIELD=VALUE; repeatable.")] = None,
    model_sets: Annotated[Optional[list[str]], typer.Option(
        "--model-set", help="ModelConfig FIELD=VALUE; repeatable.")] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="auto|cpu|cuda|cuda:N [default: auto: a GPU when present].")
                      ] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads.")
                       ] = None,
    progress: Annotated[bool, typer.Option("--progress/--quiet")] = True,
) -> None:
    """Train SegCLIP and write RUN/ckpt.pt (the checkpoint contract)."""
    try:
        import torch

        from segclip.training import train

        if threads:
            torch.set_num_threads(threads)
        overrides = parse_assignments(sets or [], "--set")
        named = {"steps": steps, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                 "seed": seed, "amp": amp, "ckpt_every": ckpt_every, "log_every": log_every,
                 "num_workers": workers}
        overrides.update({k: v for k, v in named.items() if v is not None})
        model_overrides = parse_assignments(model_sets or [], "--model-set")
        if resume and config is None and recipe is None and not overrides and not model_overrides:
            model_config = train_config = None
            recipe_name = ""
        else:
            model_config, train_config, recipe_name = build_configs(config, recipe, overrides,
                                                                    model_overrides)
        result = train(model_config, train_config, data or [], out, resume=resume,
                       clip_weights=clip_weights, progress=progress, device=device,
                       recipe=recipe_name)
    except SegclipError as e:
        raise fail(e) from None
    if result.rank == 0:
        typer.echo(f"wrote {result.run_dir / 'ckpt.pt'}: step {result.step}/{result.total_steps}, "
                   f"{result.skipped} skipped, {result.elapsed / 60:.1f} min")


if __name__ == "__main__":
    app()
