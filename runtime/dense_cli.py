"""The dense-bundle command-line options shared by `segclip-run` and `segclip-serve`
(docs/dense.md): the typer option types, and their values as `DenseSegmenter` keyword arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

PANEL = "Dense bundles"

BackgroundNames = Annotated[Optional[str], typer.Option(
    "--background-names", help="Dense bundles: comma-separated stuff names whose pixels are "
    "background, or a preset: voc.", rich_help_panel=PANEL)]
PamrSteps = Annotated[int, typer.Option(
    "--pamr", min=0, help="Dense bundles: PAMR refinement steps (0: off).", rich_help_panel=PANEL)]
AreaThd = Annotated[Optional[float], typer.Option(
    "--area-thd", help="Dense bundles: drop labels covering at most this fraction of the "
    "labelled pixels [default: the bundle's].", rich_help_panel=PANEL)]
LogitScale = Annotated[Optional[float], typer.Option(
    "--logit-scale", help="Dense bundles: multiplier of the cosine similarities [default: the "
    "bundle's].", rich_help_panel=PANEL)]


def dense_options(engine: Path, background: str | None, pamr: int, area_thd: float | None,
                  logit_scale: float | None) -> dict[str, Any]:
    """The dense-bundle flags given, as `DenseSegmenter` options (JSON-serialisable); refused for
    a SegCLIP bundle."""
    given = {"--background-names": background is not None, "--pamr": pamr > 0,
             "--area-thd": area_thd is not None, "--logit-scale": logit_scale is not None}
    if not any(given.values()):
        return {}
    from segclip.errors import ConfigError
    from segclip.runtime.bundle import Bundle
    from segclip.runtime.dense_presets import background_names

    if Bundle.open(engine).kind != "dense":
        flags = ", ".join(name for name, set_ in given.items() if set_)
        raise ConfigError(f"{flags} only apply to dense bundles (segclip-export dense); "
                          f"{engine} is a SegCLIP bundle")
    options = {"background": list(background_names(background)) if background else None,
               "pamr": pamr or None, "area_thd": area_thd, "logit_scale": logit_scale}
    return {k: v for k, v in options.items() if v is not None}
