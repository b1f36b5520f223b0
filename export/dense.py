"""ONNX export of a DenseCLIP bundle (segclip/dense; docs/dense.md).

`image.onnx`: input `image` [B, 3, S, S] float32, output `patch_emb` [B, N, E] L2-normalised,
row-major on the (S/P) x (S/P) grid (ViT-B/16 at 224: [B, 196, 512]). Exported like the SegCLIP
towers (export/onnx_graph.py: TorchScript exporter, symbolic batch, example batch 2, unchanged
blocks as `LeanBlock`s); optional `image.fp16.onnx` / `image.int8.onnx`. `text.onnx` and
`tokenizer.json` are the SegCLIP ones, from the CLIP text weights. `segclip.json` has
`"kind": "dense"`, the mode, the preprocessing (short side 1.5 S: 336 for 224; windows S with
stride S/2) and the protocol defaults (runtime/dense.py).
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
from segclip.export.blocks import lean_blocks
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
REDUCED_MIN_AGREEMENT = 0.99  # fp16 / int8: patch argmax over the parity prompts
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
    """Write and check `path` (model: eval mode, float32, CPU); returns the op histogram.

    The unchanged blocks are traced as `LeanBlock`s (export/blocks.py), as in the SegCLIP
    export; the edited last block reads the original block's modules."""
    c = model.config
    example = torch.randn(EXAMPLE_BATCH, 3, c.image_size, c.image_size,
                          generator=torch.Generator().manual_seed(0))
    specs = dense_image_specs(model)
    blocks = model.visual.transformer.resblocks
    last = blocks[-1]
    with lean_blocks(blocks, [c.grid * c.grid + 1] * len(blocks)):
        blocks[-1] = last  # restored with the others when the context ends
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


def _reduced_figures(got: np.ndarray, want: np.ndarray, text: np.ndarray) -> dict[str, float]:
    """(B, N, E) reduced-precision vs float32 patch embeddings: max |diff|, lowest cosine, and
    the fraction of patches whose argmax over the (T, E) prompt embeddings agrees."""
    cosine = (got * want).sum(-1) / np.maximum(
        np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1), 1e-12)  # (B, N)
    agree = (got @ text.T).argmax(-1) == (want @ text.T).argmax(-1)  # (B, N)
    return {"max_abs": _max_diff(got, want), "min_cosine": float(cosine.min()),
            "argmax_agreement": float(agree.mean())}


def dense_parity(model: DenseCLIP, text: Any, staging: Path,
                 images: dict[str, str] | None = None) -> dict[str, Any]:
    """ONNX Runtime (CPU) vs PyTorch: random and generated scenes at batch 1 and 3, prompts at
    1 and 5 labels. float32 graphs must agree to 1e-4; each reduced-precision image graph
    (`images`: precision -> file) must pick the same prompt as PyTorch for >= 99 % of patches.
    Raises ExportError otherwise (nothing is written)."""
    import onnxruntime as ort

    from segclip.export.parity import TEXT_PROMPTS, prompt_tokens, random_images, synthetic_images

    c = model.config
    images = images or {"fp32": contract.IMAGE_ONNX}
    opts = ["CPUExecutionProvider"]
    text_sess = ort.InferenceSession(str(staging / contract.TEXT_ONNX), providers=opts)
    worst_text = 0.0
    with torch.no_grad():
        for count in (1, len(TEXT_PROMPTS)):
            tokens = prompt_tokens(TEXT_PROMPTS[:count], text.config.context_length)  # (T, C)
            (got,) = text_sess.run([contract.TEXT_OUTPUT], {contract.TEXT_INPUT: tokens})
            want = text.encode_text(torch.from_numpy(tokens)).numpy()
            worst_text = max(worst_text, _max_diff(got, want))
        prompts = want  # (T, E) the 5 prompts' embeddings
        cases = [random_images(1, c.image_size, 1), random_images(3, c.image_size, 2),
                 synthetic_images(1, c.image_size, 3), synthetic_images(3, c.image_size, 4)]
        wants = [model(torch.from_numpy(x)).numpy() for x in cases]  # (B, N, E) each
    report: dict[str, Any] = {"text": {"max_abs": worst_text}}
    failures = [] if worst_text <= PARITY_TOL else [
        f"text max|diff| {worst_text:.2e} > {PARITY_TOL:g}"]
    for precision, name in images.items():
        sess = ort.InferenceSession(str(staging / name), providers=opts)
        figures = [_reduced_figures(sess.run([PATCH_OUTPUT], {IMAGE_INPUT: x})[0], w, prompts)
                   for x, w in zip(cases, wants)]
        worst = {"max_abs": max(f["max_abs"] for f in figures),
                 "min_cosine": min(f["min_cosine"] for f in figures),
                 "argmax_agreement": min(f["argmax_agreement"] for f in figures)}
        report[precision] = {"file": name, **worst}
        if precision == "fp32" and not worst["max_abs"] <= PARITY_TOL:
            failures.append(f"{name} patch_emb max|diff| {worst['max_abs']:.2e} > "
                            f"{PARITY_TOL:g}")
        if precision != "fp32" and not worst["argmax_agreement"] >= REDUCED_MIN_AGREEMENT:
            failures.append(f"{name} patch argmax agreement {worst['argmax_agreement']:.2%} < "
                            f"{REDUCED_MIN_AGREEMENT:.0%}")
    if failures:
        raise ExportError(f"ONNX Runtime differs from PyTorch: {'; '.join(failures)}; nothing "
                          f"was written")
    return report


def export_dense_bundle(clip_weights: str | Path, out_dir: str | Path, mode: str = "naclip",
                        opset: int = 17, fp16: bool = False, int8: bool = False,
                        progress: Callable[[str], None] | None = None) -> Path:
    """`segclip-export dense`: CLIP weights -> a verified bundle of kind "dense" at `out_dir`
    (written in a staging directory, swapped in after the parity check).

    fp16: also `image.fp16.onnx` (export/precision.py `convert_fp16`: float32 I/O, norms,
    softmaxes and reductions float32). int8: also `image.int8.onnx`, dynamic int8 weights of
    the unchanged blocks [0, L-1) (export/precision.py `quantize_int8`); the edited last block,
    `ln_post` and `proj` stay float32."""
    from segclip.checkpoint import file_sha256
    from segclip.convert._io import read_state_dict
    from segclip.dense.model import dense_from_state
    from segclip.export._files import atomic_write_json, make_staging_dir, swap_directory
    from segclip.export.bundle import check_target
    from segclip.export.onnx_graph import check_opset, export_text_onnx, text_specs
    from segclip.export.precision import convert_fp16, quantize_int8
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
        images = {"fp32": contract.IMAGE_ONNX}
        if fp16:
            say(f"converting -> {contract.IMAGE_FP16_ONNX}")
            convert_fp16(staging / contract.IMAGE_ONNX, staging / contract.IMAGE_FP16_ONNX,
                         keep_scope="/outliers/")  # SC-CLIP's LOF stays float32
            images["fp16"] = contract.IMAGE_FP16_ONNX
        if int8:
            say(f"quantising -> {contract.IMAGE_INT8_ONNX} (blocks 1..{model.config.layers - 1})")
            quantize_int8(staging / contract.IMAGE_ONNX, staging / contract.IMAGE_INT8_ONNX,
                          model.config.layers - 1)
            images["int8"] = contract.IMAGE_INT8_ONNX
        for name in images.values():
            check_graph(staging / name, opset, *dense_image_specs(model))
        say(f"exporting text tower -> {contract.TEXT_ONNX}")
        export_text_onnx(text, staging / contract.TEXT_ONNX, opset)
        check_graph(staging / contract.TEXT_ONNX, opset, *text_specs(text))
        write_tokenizer_file(staging / contract.TOKENIZER_FILE)
        say("checking parity with PyTorch (ONNX Runtime CPU)")
        parity = dense_parity(model, text, staging, images)
        c = model.config
        keys = {"fp32": "image", "fp16": "image_fp16", "int8": "image_int8"}
        files = {**{keys[p]: name for p, name in images.items()}, "text": contract.TEXT_ONNX,
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
                              "color": "RGB", "resize_short_side": c.image_size * 3 // 2,
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
            "parity": {**parity, "tolerance": PARITY_TOL,
                       "reduced_min_agreement": REDUCED_MIN_AGREEMENT},
            "engines": [],
        }
        atomic_write_json(staging / contract.MANIFEST_FILE, manifest)  # last: marks completion
        swap_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"bundle written to {out_dir} in {time.perf_counter() - start:.1f} s")
    return out_dir
