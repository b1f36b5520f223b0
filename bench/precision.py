"""Precision of the image-graph variants on an evaluation set, against PyTorch eager.

    python bench/precision.py --checkpoint CKPT --data EVAL_DIR [--bundle DIR]
        [--precisions fp32,fp16,int8,ov-f32,ov-bf16,ov-int8] [--limit N] [--threshold T]
        [--threads 1] [--out FILE.json]

EVAL_DIR is a VOC-layout folder with its classes.txt (`segclip-data synth` writes OUT/eval).
Without --bundle the checkpoint is exported to a temporary folder with all three image graphs
(`export_bundle(..., fp16=True, int8=True)` without its parity gate: the figures here are the
measurement), plus its OpenVINO variants when any is asked for (`export_openvino`, int8 IR
calibrated on generated scenes). Per variant, over every image (ONNX Runtime or OpenVINO on the
CPU, PyTorch eager on CPU):

- raw outputs: max |ORT - torch| of `global`, `regions`, `assign` on the same preprocessed
  windows (segclip.runtime.images.preprocess), and the per-pixel region-argmax agreement (argmax
  over L of `assign` upsampled bilinearly to S x S, as export/parity.py), pooled over all
  windows and for the worst image;
- label maps: `segclip.runtime.Segmenter` with that image graph against the PyTorch label maps
  of segclip-eval's protocol (segclip/evaluation/protocol.py), the one reference for every
  precision (so the fp32 row shows what the runtime itself changes), and against the runtime's
  fp32 maps; pooled over all pixels and for the worst image;
- mIoU of the runtime's label maps against the ground truth, beside PyTorch's (segclip-eval's).

One threshold for all: --threshold, else the checkpoint's recorded one, else 0.80.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/precision.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(ROOT))

PRECISIONS = ("fp32", "fp16", "int8", "ov-f32", "ov-bf16", "ov-int8")  # runtime/variants.py
DEFAULT_PRECISIONS = ("fp32", "fp16", "int8")
OUTPUTS = ("global", "regions", "assign")  # segclip.runtime.contract.IMAGE_OUTPUTS
LABEL_REFERENCE = ("PyTorch label maps of segclip-eval's protocol "
                   "(segclip.evaluation.protocol.predict) on the checkpoint")


class UsageError(Exception):
    """A bad option or input: one line on stderr, exit code 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="segclip checkpoint")
    parser.add_argument("--data", type=Path, required=True,
                        help="VOC-layout evaluation folder (with classes.txt)")
    parser.add_argument("--classes", type=Path, help="class list (default: DATA/classes.txt)")
    parser.add_argument("--bundle", type=Path,
                        help="bundle exported from CKPT with the variants to measure "
                             "(default: export one to a temporary folder)")
    parser.add_argument("--precisions", default=",".join(DEFAULT_PRECISIONS),
                        help=f"comma-separated, of {', '.join(PRECISIONS)}")
    parser.add_argument("--limit", type=int, help="first N images only")
    parser.add_argument("--threshold", type=float,
                        help="background threshold (default: the checkpoint's, else 0.80)")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op and torch threads")
    parser.add_argument("--out", type=Path, help="JSON results (default: bench/results/"
                                                 "<machine>/precision.json)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """The precisions to measure; raises UsageError on a bad option."""
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown or not precisions:
        raise UsageError(f"--precisions takes {', '.join(PRECISIONS)}, got {args.precisions!r}")
    if not args.checkpoint.is_file():
        raise UsageError(f"--checkpoint {args.checkpoint} does not exist")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {args.threshold}")
    return [p for p in PRECISIONS if p in precisions]  # fp32 first: the others compare with it


class Tally:
    """Running figures of one precision over the images."""

    def __init__(self, num_classes: int) -> None:
        self.max_abs = dict.fromkeys(OUTPUTS, 0.0)
        self.counts = {"argmax": [0, 0], "label_torch": [0, 0], "label_fp32": [0, 0]}  # same, all
        self.worst = {"argmax": 1.0, "label_torch": 1.0, "label_fp32": 1.0}
        self.confusion = np.zeros((num_classes, num_classes), np.int64)

    def agree(self, key: str, same: np.ndarray) -> None:
        self.counts[key][0] += int(same.sum())
        self.counts[key][1] += same.size
        self.worst[key] = min(self.worst[key], float(same.mean()))

    def summary(self) -> dict[str, Any]:
        from segclip.evaluation.metrics import mean_iou

        def pooled(key: str) -> float | None:
            same, total = self.counts[key]
            return same / total if total else None

        return {"max_abs": self.max_abs,
                "region_argmax_agreement": pooled("argmax"),
                "region_argmax_worst_image": self.worst["argmax"],
                "label_agreement_vs_torch": pooled("label_torch"),
                "label_worst_image_vs_torch": self.worst["label_torch"],
                "label_agreement_vs_fp32_runtime": pooled("label_fp32"),
                "label_worst_image_vs_fp32_runtime":
                    self.worst["label_fp32"] if self.counts["label_fp32"][1] else None,
                "miou": mean_iou(self.confusion)}


def open_bundle(args: argparse.Namespace, precisions: list[str], scratch: Path) -> Path:
    """--bundle, checked to hold every requested variant, or a fresh export in `scratch`."""
    from segclip.runtime import Bundle
    from segclip.runtime.errors import BundleError

    if args.bundle is None:
        from segclip.export import export_bundle

        print(f"exporting {args.checkpoint} (fp32, fp16, int8) to a temporary bundle", flush=True)
        bundle_dir = export_bundle(args.checkpoint, scratch / "bundle", fp16=True, int8=True,
                                   verify=False)
        if any(p.startswith("ov-") for p in precisions):
            from segclip.export.openvino import export_openvino

            print("adding the OpenVINO variants (int8: NNCF, generated calibration scenes)",
                  flush=True)
            export_openvino(bundle_dir, args.checkpoint, int8="ov-int8" in precisions)
        return bundle_dir
    try:
        bundle = Bundle.open(args.bundle)
        for precision in precisions:
            if precision.startswith("ov-"):
                _image_runner(bundle, precision, 1).close()  # refuses a missing IR / no bf16
            else:
                bundle.image_onnx(precision)
    except BundleError as e:
        raise UsageError(str(e)) from e
    return args.bundle


def pick_threshold(args: argparse.Namespace, payload: dict[str, Any]) -> float:
    from segclip.runtime.contract import DEFAULT_THRESHOLD

    if args.threshold is not None:
        return float(args.threshold)
    recorded = payload.get("meta", {}).get("threshold")
    return float(recorded) if isinstance(recorded, (int, float)) else DEFAULT_THRESHOLD


def measure(args: argparse.Namespace, precisions: list[str], bundle_dir: Path,
            threshold: float) -> dict[str, Any]:
    """Run every image through PyTorch and each precision; the per-precision figures."""
    import torch

    from segclip.checkpoint import load_checkpoint
    from segclip.evaluation.datasets import VocDataset
    from segclip.evaluation.evaluate import resolve_classes
    from segclip.evaluation.metrics import confusion_matrix, mean_iou
    from segclip.evaluation.protocol import Protocol, encode_labels
    from segclip.runtime import Bundle

    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint).eval()
    names = list(resolve_classes(args.data, args.classes).names)
    dataset = VocDataset(args.data)
    count = min(len(dataset), args.limit or len(dataset))
    bundle = Bundle.open(bundle_dir)
    runs = {p: _runners(bundle, p, threshold, args.threads) for p in precisions}
    tallies = {p: Tally(len(names) + 1) for p in precisions}
    torch_confusion = np.zeros((len(names) + 1,) * 2, np.int64)
    text = encode_labels(model, names)  # (K, E)
    protocol = Protocol(window=model.config.image_size, threshold=threshold)
    for index in range(count):
        sample = dataset[index]
        reference = _torch_image(model, sample.image, text, protocol, bundle)
        torch_confusion += confusion_matrix(reference["label_map"], sample.mask, len(names) + 1)
        fp32_map = None
        for precision in precisions:
            label_map = _compare(runs[precision], tallies[precision], sample, names, reference,
                                 fp32_map)
            fp32_map = label_map if precision == "fp32" else fp32_map
            tallies[precision].confusion += confusion_matrix(label_map, sample.mask,
                                                             len(names) + 1)
        if (index + 1) % 20 == 0 or index + 1 == count:
            print(f"  {index + 1}/{count} images", flush=True)
    results = {p: tallies[p].summary() for p in precisions}  # vs fp32: None without fp32 maps
    return {"images": count, "classes": len(names), "precisions": results,
            "torch": {"miou": mean_iou(torch_confusion)}}


class _OrtImage:
    """(n, 3, S, S) windows -> [global, regions, assign] with an ONNX Runtime session."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        from bench._towers import ort_options

        self.session = ort.InferenceSession(str(path), ort_options(threads),
                                            providers=["CPUExecutionProvider"])

    def __call__(self, windows: np.ndarray) -> list[np.ndarray]:
        return self.session.run(list(OUTPUTS), {"image": windows})

    def close(self) -> None:
        self.session = None


class _OvImage:
    """The same with the runtime's OpenVINO backend (variant ov-f32 / ov-bf16 / ov-int8)."""

    def __init__(self, bundle: Any, variant: str, threads: int) -> None:
        from segclip.runtime.backends.openvino import OpenVinoBackend, OpenVinoOptions

        self.backend = OpenVinoBackend(bundle, variant, OpenVinoOptions(threads=threads))

    def __call__(self, windows: np.ndarray) -> list[np.ndarray]:
        out = self.backend.run_image(windows)
        return [out.global_, out.regions, out.assign]

    def close(self) -> None:
        self.backend.close()


def _image_runner(bundle: Any, precision: str, threads: int) -> Any:
    if precision.startswith("ov-"):
        return _OvImage(bundle, precision, threads)
    return _OrtImage(bundle.image_onnx(precision), threads)


def _runners(bundle: Any, precision: str, threshold: float, threads: int) -> dict[str, Any]:
    from segclip.runtime import Segmenter

    segmenter = Segmenter(bundle, device="cpu", variant=precision, threshold=threshold,
                          threads=threads)
    return {"image": _image_runner(bundle, precision, threads), "segmenter": segmenter}


def _torch_image(model: Any, image: np.ndarray, text: Any, protocol: Any,
                 bundle: Any) -> dict[str, np.ndarray]:
    """PyTorch's outputs on the runtime's windows, their region argmax, and its label map."""
    import torch

    from segclip.evaluation.protocol import predict
    from segclip.export.parity import region_argmax
    from segclip.runtime.images import preprocess

    windows = preprocess(image, bundle.image_size, bundle.mean, bundle.std).windows  # (n,3,S,S)
    with torch.no_grad():
        out = model.encode_image(torch.from_numpy(windows))
    assign = out.assign.numpy()  # (n, L, h, w)
    return {"windows": windows, "global": out.global_embedding.numpy(),
            "regions": out.regions.numpy(), "assign": assign,
            "argmax": region_argmax(assign, bundle.image_size),  # (n, S, S)
            "label_map": predict(model, image, text, protocol).label_map.numpy()}  # (H, W)


def _compare(run: dict[str, Any], tally: Tally, sample: Any, names: list[str],
             reference: dict[str, np.ndarray], fp32_map: np.ndarray | None) -> np.ndarray:
    """Add one image's figures of one precision to `tally`; its runtime label map."""
    from segclip.export.parity import region_argmax

    outputs = run["image"](reference["windows"])
    for name, got in zip(OUTPUTS, outputs):
        tally.max_abs[name] = max(tally.max_abs[name],
                                  float(np.abs(got - reference[name]).max()))
    size = reference["windows"].shape[-1]
    tally.agree("argmax", region_argmax(outputs[2], size) == reference["argmax"])  # (n, S, S)
    label_map = np.asarray(run["segmenter"].segment(sample.image, names).label_map)  # (H, W)
    tally.agree("label_torch", label_map == reference["label_map"])
    if fp32_map is not None:
        tally.agree("label_fp32", label_map == fp32_map)
    return label_map


def print_table(results: dict[str, Any]) -> None:
    from bench._summary import text_table

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.3f} %"

    header = ["graph", "max|diff| global/regions/assign", "region argmax (worst image)",
              "label map vs torch (worst)", "vs fp32 runtime", "mIoU"]
    rows = [[precision,
             " / ".join(f"{item['max_abs'][k]:.1e}" for k in OUTPUTS),
             f"{pct(item['region_argmax_agreement'])} ({pct(item['region_argmax_worst_image'])})",
             f"{pct(item['label_agreement_vs_torch'])} "
             f"({pct(item['label_worst_image_vs_torch'])})",
             pct(item["label_agreement_vs_fp32_runtime"]), pct(item["miou"])]
            for precision, item in results["precisions"].items()]
    rows.append(["torch", "-", "-", "-", "-", pct(results["torch"]["miou"])])
    print(text_table(header, rows))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench._machine import describe, machine_info, machine_slug
    from segclip.checkpoint import file_sha256, read_checkpoint

    precisions = check_args(args)
    if not (args.data / "ImageSets").is_dir():
        raise UsageError(f"--data {args.data} is not a VOC-layout folder (no ImageSets/); pass "
                         f"the eval folder of `segclip-data synth`, e.g. OUT/eval")
    machine = machine_info()
    print(describe(machine), flush=True)
    start = time.perf_counter()
    threshold = pick_threshold(args, read_checkpoint(args.checkpoint))
    with tempfile.TemporaryDirectory(prefix="segclip-precision-") as scratch:
        bundle_dir = open_bundle(args, precisions, Path(scratch))
        figures = measure(args, precisions, bundle_dir, threshold)
        manifest = json.loads((bundle_dir / "segclip.json").read_text())
    return {"benchmark": "precision",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "machine": machine, "machine_slug": machine_slug(machine),
            "checkpoint": {"path": str(args.checkpoint),
                           "sha256": file_sha256(args.checkpoint)},
            "data": {"path": str(args.data), "images": figures.pop("images"),
                     "classes": figures.pop("classes")},
            "bundle": {"path": str(args.bundle) if args.bundle else None,
                       "exported_here": args.bundle is None, "files": manifest["files"],
                       "file_bytes": manifest.get("file_bytes", {})},
            "threshold": threshold, "threads": args.threads,
            "backend": "onnxruntime CPUExecutionProvider (fp32, fp16, int8); OpenVINO CPU "
                       "(ov-*); torch eager CPU float32",
            "region_argmax_at": "argmax over L of assign upsampled bilinearly "
                                "(align_corners=False) to S x S, per window",
            "label_reference": LABEL_REFERENCE, **figures,
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    from segclip.errors import SegclipError

    args = parse_args(argv)
    try:
        results = run(args)
    except (UsageError, SegclipError) as e:  # bad options, data or bundle: one line
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print_table(results)
    from segclip.runtime._atomic import atomic_write_bytes

    out = args.out or ROOT / "bench" / "results" / results["machine_slug"] / "precision.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(results, indent=1) + "\n").encode("utf-8"))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
