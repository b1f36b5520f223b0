"""Export the paper-size `vit-b16` preset (random weights) and report export time and parity.

Not a test: a one-off measurement on CPU. Saves a seeded random checkpoint, exports the bundle
with fp16 and int8 variants (timed per stage), then measures ONNX Runtime vs PyTorch parity of
every graph (timed separately), and prints the figures as JSON.

    python bench/export_vitb16.py --work /tmp/vitb16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/segclip-vitb16"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from segclip import ModelConfig, SegCLIP, save_checkpoint
    from segclip.export.bundle import export_bundle
    from segclip.export.manifest import summary_table
    from segclip.export.parity import measure_parity

    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    checkpoint = args.work / "ckpt.pt"
    save_checkpoint(SegCLIP(ModelConfig.preset("vit-b16")), checkpoint, inference_only=True)
    start = last = time.perf_counter()
    stages: dict[str, float] = {}  # step message -> seconds until the next message
    previous = "start"

    def progress(message: str) -> None:
        nonlocal last, previous
        now = time.perf_counter()
        print(f"[{now - start:7.1f} s] {message}", flush=True)
        stages[previous] = round(now - last, 1)
        last, previous = now, message

    bundle = export_bundle(checkpoint, args.work / "bundle", fp16=True, int8=True, verify=False,
                           progress=progress)
    export_seconds = time.perf_counter() - start
    from segclip.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint)
    start_parity = time.perf_counter()
    report = measure_parity(model, bundle, {"fp32": "image.onnx", "fp16": "image.fp16.onnx",
                                            "int8": "image.int8.onnx"})
    parity_seconds = time.perf_counter() - start_parity
    print(summary_table(bundle))
    print(json.dumps({"export_seconds_without_parity": round(export_seconds, 1),
                      "parity_seconds": round(parity_seconds, 1), "stages": stages,
                      "torch_threads": torch.get_num_threads(),
                      "parity": report.to_dict()}, indent=2))


if __name__ == "__main__":
    main()
