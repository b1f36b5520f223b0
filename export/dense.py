"""ONNX export of a DenseCLIP bundle (segclip/dense; docs/dense.md).

`image.onnx`: input `image` [B, 3, S, S] float32, output `patch_emb` [B, N, E] L2-normalised,
row-major on the (S/P) x (S/P) grid (ViT-B/16 at 224: [B, 196, 512]). Exported like the SegCLIP
towers (export/onnx_graph.py: TorchScript exporter, symbolic batch, example batch 2).
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from segclip.dense import DenseCLIP
from segclip.export.errors import ExportError
from segclip.export.onnx_graph import (
    BATCH_DIM,
    EXAMPLE_BATCH,
    TensorSpec,
    _export,
    check_graph,
)
from segclip.runtime import contract

IMAGE_INPUT = contract.IMAGE_INPUT  # "image"
PATCH_OUTPUT = "patch_emb"
PARITY_TOL = 1e-4
# the SCLIP-family inference protocol recorded in segclip.json (docs/dense.md)
PROTOCOL = {"templates": "openai-imagenet-80", "synonyms": "max", "window": "average-count-map",
            "prob_thd": 0.0, "area_thd": 0.0, "logit_scale": 50.0}


def dense_image_specs(model: DenseCLIP) -> tuple[list[TensorSpec], list[TensorSpec]]:
    c = model.config
    f32 = onnx.TensorProto.FLOAT
    inputs = [TensorSpec(IMAGE_INPUT, f32, (BATCH_DIM, 3, c.image_size, c.image_size))]
    outputs = [TensorSpec(PATCH_OUTPUT, f32, (BATCH_DIM, c.grid * c.grid, c.embed_dim))]
    return inputs, outputs


def export_dense_image_onnx(model: DenseCLIP, path: Path, opset: int = 17) -> Counter[str]:
    """Write and check `path` (model: eval mode, float32, CPU); returns the op histogram."""
    c = model.config
    example = torch.randn(EXAMPLE_BATCH, 3, c.image_size, c.image_size,
                          generator=torch.Generator().manual_seed(0))
    specs = dense_image_specs(model)
    _export(model.eval(), example, Path(path), opset, *specs)
    return check_graph(Path(path), opset, *specs)


def text_model(state: dict[str, torch.Tensor], vision: Any, source: str) -> Any:
    """A SegCLIP whose text tower holds the CLIP text weights of `state` (only the text tower
    is exported from it; head width 64 as in every CLIP)."""
    from segclip.config import ModelConfig
    from segclip.convert.clip import load_clip_state
    from segclip.model import SegCLIP

    try:
        width = state["ln_final.weight"].shape[0]
        config = ModelConfig(
            image_size=vision.image_size, patch_size=vision.patch_size,
            vision_width=vision.width, vision_layers=vision.layers,
            vision_heads=vision.width // vision.head_width, group_layer=vision.layers - 1,
            embed_dim=vision.embed_dim, vocab_size=state["token_embedding.weight"].shape[0],
            context_length=state["positional_embedding"].shape[0], text_width=width,
            text_layers=len({n.split(".")[2] for n in state
                             if n.startswith("transformer.resblocks.")}),
            text_heads=width // 64, with_reconstruction=False)
    except KeyError as err:
        raise ExportError(f"{source}: no CLIP text tower (tensor {err.args[0]} missing)") from None
    model = SegCLIP(config)
    load_clip_state(model, state, source)
    if "logit_scale" in state:
        model.logit_scale.data.copy_(state["logit_scale"].float())
    return model.eval()


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def dense_parity(model: DenseCLIP, text: Any, staging: Path) -> dict[str, float]:
    """ONNX Runtime (CPU) vs PyTorch on batches 1 and 3 and 1 and 5 labels; raises
    ExportError above 1e-4."""
    import onnxruntime as ort

    c = model.config
    gen = torch.Generator().manual_seed(7)
    opts = ["CPUExecutionProvider"]
    image = ort.InferenceSession(str(staging / contract.IMAGE_ONNX), providers=opts)
    text_sess = ort.InferenceSession(str(staging / contract.TEXT_ONNX), providers=opts)
    worst = {"patch_emb": 0.0, "text": 0.0}
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, 3, c.image_size, c.image_size, generator=gen)
            (got,) = image.run([PATCH_OUTPUT], {IMAGE_INPUT: x.numpy()})
            worst["patch_emb"] = max(worst["patch_emb"], _max_diff(got, model(x).numpy()))
        ctx, vocab = text.config.context_length, text.config.vocab_size
        for labels in (1, 5):
            tokens = torch.zeros(labels, ctx, dtype=torch.int64)  # (T, C)
            tokens[:, 0] = vocab - 2
            tokens[:, 1:4] = torch.randint(1, vocab - 2, (labels, 3), generator=gen)
            tokens[:, 4] = vocab - 1
            (got,) = text_sess.run([contract.TEXT_OUTPUT], {contract.TEXT_INPUT: tokens.numpy()})
            want = text.encode_text(tokens).numpy()
            worst["text"] = max(worst["text"], _max_diff(got, want))
    for name, diff in worst.items():
        if not diff <= PARITY_TOL:
            raise ExportError(f"{name}: ONNX Runtime differs from PyTorch by {diff:.2e} "
                              f"(> {PARITY_TOL:g}); nothing was written")
    return worst


def export_dense_bundle(clip_weights: str | Path, out_dir: str | Path, mode: str = "naclip",
                        opset: int = 17, progress: Callable[[str], None] | None = None) -> Path:
    """`segclip-export dense`: CLIP weights -> a verified bundle of kind "dense" at `out_dir`
    (written in a staging directory, swapped in after the parity check)."""
    from segclip.checkpoint import file_sha256
    from segclip.convert._io import read_state_dict
    from segclip.dense.model import dense_from_state
    from segclip.export._files import atomic_write_json, make_staging_dir, swap_directory
    from segclip.export.bundle import check_target
    from segclip.export.onnx_graph import check_opset, export_text_onnx, text_specs
    from segclip.export.tokenizer_file import write_tokenizer_file

    say = progress or (lambda _: None)
    start = time.perf_counter()
    clip_weights, out_dir = Path(clip_weights), Path(out_dir)
    check_opset(opset)
    check_target(out_dir)
    state = read_state_dict(clip_weights, "CLIP")
    model = dense_from_state(state, mode, str(clip_weights))
    text = text_model(state, model.config, str(clip_weights))
    say(f"loaded {clip_weights}: {model.config.layers} blocks, width {model.config.width}, "
        f"mode {mode}")
    try:
        staging = make_staging_dir(out_dir)
    except OSError as e:
        raise ExportError(f"cannot create the bundle directory {out_dir}: {e}") from e
    try:
        say(f"exporting image tower ({mode}) -> {contract.IMAGE_ONNX}")
        export_dense_image_onnx(model, staging / contract.IMAGE_ONNX, opset)
        say(f"exporting text tower -> {contract.TEXT_ONNX}")
        export_text_onnx(text, staging / contract.TEXT_ONNX, opset)
        check_graph(staging / contract.TEXT_ONNX, opset, *text_specs(text))
        write_tokenizer_file(staging / contract.TOKENIZER_FILE)
        say("checking parity with PyTorch (ONNX Runtime CPU)")
        parity = dense_parity(model, text, staging)
        c = model.config
        files = {"image": contract.IMAGE_ONNX, "text": contract.TEXT_ONNX,
                 "tokenizer": contract.TOKENIZER_FILE}
        manifest = {
            "format": contract.BUNDLE_FORMAT, "version": contract.BUNDLE_VERSION,
            "kind": "dense", "mode": mode,
            "model": {"image_size": c.image_size, "patch_size": c.patch_size,
                      "grid_size": c.grid, "embed_dim": c.embed_dim, "width": c.width,
                      "layers": c.layers, "sigma": c.sigma,
                      "context_length": text.config.context_length,
                      "vocab_size": text.config.vocab_size,
                      "logit_scale": float(text.scale().detach())},
            "preprocessing": {"mean": list(contract.CLIP_MEAN), "std": list(contract.CLIP_STD),
                              "color": "RGB", "resize_short_side": 336,
                              "resize_interpolation": "bilinear", "window": c.image_size,
                              "stride": c.image_size // 2},
            "protocol": dict(PROTOCOL),
            "files": files,
            "file_bytes": {n: (staging / n).stat().st_size for n in files.values()},
            "tensors": {"image": {"input": IMAGE_INPUT, "outputs": [PATCH_OUTPUT],
                                  "dynamic": {contract.BATCH_DIM: 0}},
                        "text": {"input": contract.TEXT_INPUT, "outputs": [contract.TEXT_OUTPUT],
                                 "dynamic": {contract.LABELS_DIM: 0}}},
            "source": {"clip_weights": clip_weights.name,
                       "clip_weights_sha256": file_sha256(clip_weights)},
            "export": {"opset": opset, "seconds": round(time.perf_counter() - start, 2),
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "parity": {"max_abs": parity, "tolerance": PARITY_TOL},
            "engines": [],
        }
        atomic_write_json(staging / contract.MANIFEST_FILE, manifest)  # last: marks completion
        swap_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"bundle written to {out_dir} in {time.perf_counter() - start:.1f} s")
    return out_dir
