"""Dense CLIP modes (docs/dense.md): export time, parity and image-tower latency per mode, beside
the SegCLIP image tower of the same size, plus the runtime protocol's own cost per image.

    python bench/dense.py --work /tmp/dense-bench [--size vit-b16|tiny] [--modes naclip,...]
        [--threads 1] [--reps 10] [--out FILE.json]

Random weights (seeded): an open_clip-layout CLIP state dict (ViT-B/16 and its text tower for
`vit-b16`) is saved, each mode is exported with `export_dense_bundle` (timed; its parity figures
are read from segclip.json), and a SegCLIP bundle of the same tower size is exported with
`export_bundle`. Latency: every image graph in its own ONNX Runtime CPU session (the runtime's
options: intra-op `--threads`, sequential), timed round-robin at batch 1 (interleaved, so load
from other work on the machine hits all graphs alike; quote ratios), median and p90 of `--reps`.
Protocol: `DenseSegmenter`'s stages on a 500 x 375 image with the VOC preset's 20 classes and
26 background names (precomputed text, so the text tower is not timed): windows, assignment,
and assignment with PAMR 10 steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/dense.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(ROOT))

MODES = ("naclip", "sclip", "clearclip", "maskclip", "scclip")


def clip_state(size: str, seed: int) -> dict[str, Any]:
    """A seeded random CLIP state dict in open_clip layout (visual.*, text tower, logit_scale)."""
    import torch

    from segclip.config import ModelConfig
    from segclip.model import SegCLIP

    torch.manual_seed(seed)
    if size == "vit-b16":
        config = ModelConfig.preset("vit-b16")
    else:  # a 12-block tower small enough for tests (SC-CLIP needs 12 blocks' numbering)
        config = ModelConfig(image_size=96, patch_size=16, vision_width=64, vision_layers=12,
                             vision_heads=1, group_layer=11, num_centers=2, cross_layers=1,
                             embed_dim=32, text_width=64, text_layers=1, text_heads=1,
                             with_reconstruction=False)
    model = SegCLIP(config)
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(("group.", "decoder.", "recon"))}, model


def _timed_export(args: argparse.Namespace, clip: Path) -> dict[str, Any]:
    from segclip.export.dense import export_dense_bundle

    exports = {}
    for mode in args.modes:
        start = time.perf_counter()
        export_dense_bundle(clip, args.work / f"dense-{mode}", mode=mode)
        seconds = time.perf_counter() - start
        manifest = json.loads((args.work / f"dense-{mode}" / "segclip.json").read_text())
        exports[mode] = {"export_s": round(seconds, 2), "parity": manifest["parity"]}
        print(f"exported {mode} in {seconds:.1f} s", file=sys.stderr)
    return exports


def _latency(graphs: dict[str, Path], size: int, threads: int, reps: int) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT / "bench"))
    from bench._towers import ort_options

    sessions = {name: ort.InferenceSession(str(path), ort_options(threads),
                                           providers=["CPUExecutionProvider"])
                for name, path in graphs.items()}
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(2):  # warm-up
        for s in sessions.values():
            s.run(None, {"image": x})
    for _ in range(reps):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {"image": x})
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": round(statistics.median(t), 2),
                   "p90_ms": round(sorted(t)[int(0.9 * (len(t) - 1))], 2), "reps": len(t)}
            for name, t in times.items()}


def _protocol(bundle: Path, reps: int, threads: int) -> dict[str, Any]:
    """Per-stage ms of DenseSegmenter on a 500 x 375 image, VOC preset, text precomputed."""
    import numpy as np

    from segclip.evaluation.datasets import load_classes
    from segclip.runtime.dense import DenseSettings, LogitMaps, assign_dense, chunk_size, upsample
    from segclip.runtime.dense_presets import VOC_BACKGROUND
    from segclip.runtime.dense_segmenter import DenseSegmenter
    from segclip.runtime.images import normalize, resize_to

    seg = DenseSegmenter(bundle, device="cpu", threads=threads)
    classes = load_classes("voc").names
    names = len(classes) + len(VOC_BACKGROUND)
    owner = np.array([*range(len(classes)), *([-1] * len(VOC_BACKGROUND))])
    text = np.random.default_rng(1).standard_normal((names, seg.bundle.embed_dim))
    text = (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)
    image = np.random.default_rng(2).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    out: dict[str, list[float]] = {"prepare": [], "image_graph": [], "assign": [],
                                   "assign_pamr10": []}
    for _ in range(reps):
        start = time.perf_counter()
        item = seg._prepare(image)
        out["prepare"].append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        patches = seg._patches(item["windows"])
        out["image_graph"].append((time.perf_counter() - start) * 1e3)
        guide = upsample(normalize(resize_to(image, *item["resized"])), *item["original"])
        for key, steps in (("assign", 0), ("assign_pamr10", 10)):
            maps = LogitMaps(patches, item["origins"], text, item["resized"], item["original"],
                             seg.bundle.dense.window, DenseSettings(pamr_steps=steps), guide)
            start = time.perf_counter()
            assign_dense(maps, owner, len(classes), 0.1, 0.1, chunk_size(375 * 500))
            out[key].append((time.perf_counter() - start) * 1e3)
    seg.close()
    return {"image": "500x375", "resized": list(item["resized"]),
            "windows": len(item["origins"]),
            "names": names, **{k: round(statistics.median(v), 1) for k, v in out.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/segclip-dense-bench"))
    parser.add_argument("--size", choices=("vit-b16", "tiny"), default="vit-b16")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")

    import torch

    from segclip.checkpoint import save_checkpoint
    from segclip.export.bundle import export_bundle

    args.work.mkdir(parents=True, exist_ok=True)
    state, model = clip_state(args.size, args.seed)
    clip = args.work / "clip.pt"
    torch.save(state, clip)
    report: dict[str, Any] = {"size": args.size, "threads": args.threads,
                              "exports": _timed_export(args, clip)}
    checkpoint = args.work / "segclip.pt"
    save_checkpoint(model, checkpoint, inference_only=True)
    start = time.perf_counter()
    export_bundle(checkpoint, args.work / "segclip-bundle")
    report["segclip_export_s"] = round(time.perf_counter() - start, 2)
    graphs = {f"dense-{m}": args.work / f"dense-{m}" / "image.onnx" for m in args.modes}
    graphs["segclip"] = args.work / "segclip-bundle" / "image.onnx"
    size = model.config.image_size
    report["image_tower_batch1"] = _latency(graphs, size, args.threads, args.reps)
    base = report["image_tower_batch1"]["segclip"]["median_ms"]
    for name, row in report["image_tower_batch1"].items():
        row["x_segclip"] = round(row["median_ms"] / base, 3)
    report["protocol_ms"] = _protocol(args.work / f"dense-{args.modes[0]}",
                                      max(1, args.reps // 5), args.threads)
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
