"""`make demo`: the whole pipeline on the synthetic shapes world, end to end, in about a minute.

    python -m segclip.demo            # shipped model segclip/assets/demo_tiny.pt
    python -m segclip.demo --train    # `make demo TRAIN=1`: retrain the tiny model first (slow)

Steps, each through the project's own commands and each skipped when its result exists:
1. out/demo/ckpt.pt: a copy of the shipped `segclip/assets/demo_tiny.pt`, or with --train the
   result of `scripts/train_demo_tiny.sh` (the committed recipe: synthetic world,
   superpixels, `segclip-train --config tiny --recipe synth`, resumable) run with
   WORK=out/demo/train and ASSET=out/demo/ckpt.pt, so the shipped asset is left alone;
2. `segclip-export onnx out/demo/ckpt.pt --out out/demo/bundle` (skipped when the bundle is
   newer than the checkpoint and was exported from it);
3. the held-out evaluation set, `segclip-data synth out/demo/data --num 0 --val-num 0
   --eval-num N` (VOC layout in out/demo/data/eval, with classes.txt);
4. `segclip-run --engine out/demo/bundle --labels classes.txt --skip-existing` over its
   JPEGImages into out/demo/run (emptied first when the bundle was re-exported);
5. mIoU of the written label maps against SegmentationClass (torch-free confusion matrix),
   printed as a per-class table and written to out/demo/miou.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from segclip.errors import SegclipError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = Path(__file__).resolve().parent / "assets" / "demo_tiny.pt"
MANIFEST = "segclip.json"


class DemoError(SegclipError):
    """A demo step cannot run (missing model, a failing command)."""


def _script(name: str) -> str:
    """The console script installed beside this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        raise DemoError(f"{name} is not installed; run `make install` first")
    return found


def _run(args: list[str], env: dict[str, str] | None = None) -> None:
    command = [_script(args[0]), *args[1:]] if args[0].startswith("segclip-") else args
    print(f"$ {' '.join(args)}", flush=True)
    result = subprocess.run(command, env={**os.environ, **env} if env else None)
    if result.returncode != 0:
        raise DemoError(f"`{' '.join(args)}` failed with exit code {result.returncode} (its "
                        f"message is above)")


def _train(out: Path, target: Path, train_num: int | None) -> Path:
    script = REPO / "scripts" / "train_demo_tiny.sh"
    if not script.is_file():
        raise DemoError(f"{script} is missing: --train needs a source checkout of segclip")
    env = {"WORK": str((out / "train").resolve()), "ASSET": str(target.resolve()),
           "PY": sys.executable}
    if train_num is not None:
        env["NUM"] = str(train_num)
    out.mkdir(parents=True, exist_ok=True)
    _run(["bash", str(script)], env=env)
    return target


def _checkpoint(out: Path, train: bool, train_num: int | None) -> Path:
    """out/demo/ckpt.pt, trained (--train) or copied from the shipped model."""
    from segclip.checkpoint import file_sha256

    target = out / "ckpt.pt"
    if train:
        return _train(out, target, train_num)
    if not SHIPPED.is_file():
        raise DemoError(
            f"the demo model {SHIPPED.relative_to(REPO)} is not there yet (it is trained and "
            f"shipped separately); train one here with `make demo TRAIN=1` "
            f"(scripts/train_demo_tiny.sh: slow on a small CPU)")
    if not target.is_file() or file_sha256(target) != file_sha256(SHIPPED):
        out.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.copy2(SHIPPED, partial)  # keeps the mtime: an up-to-date bundle stays current
        os.replace(partial, target)
    return target


def _bundle_is_current(bundle: Path, checkpoint: Path) -> bool:
    from segclip.checkpoint import file_sha256

    manifest_path = bundle / MANIFEST
    if not manifest_path.is_file() or manifest_path.stat().st_mtime < checkpoint.stat().st_mtime:
        return False
    source = json.loads(manifest_path.read_text()).get("source", {})
    return source.get("checkpoint_sha256") == file_sha256(checkpoint)


def _threshold(checkpoint: Path) -> float | None:
    """The background threshold the checkpoint's training run chose, if it recorded one."""
    from segclip.checkpoint import read_checkpoint

    value = read_checkpoint(checkpoint).get("meta", {}).get("threshold")
    return float(value) if isinstance(value, (int, float)) else None


def _miou(data: Path, run: Path) -> dict:
    from segclip.evaluation.metrics import confusion_matrix, format_table, iou_per_class, mean_iou

    names = [n.strip() for n in (data / "classes.txt").read_text().splitlines() if n.strip()]
    ids = [i.strip() for i in (data / "ImageSets" / "Segmentation" / "val.txt")
           .read_text().splitlines() if i.strip()]
    confusion = np.zeros((len(names) + 1,) * 2, np.int64)
    for image_id in ids:
        predicted = np.asarray(Image.open(run / f"{image_id}.png"))
        truth = np.asarray(Image.open(data / "SegmentationClass" / f"{image_id}.png"))
        confusion += confusion_matrix(predicted, truth, len(names) + 1)
    iou = iou_per_class(confusion)
    miou = mean_iou(confusion)
    print(format_table(["background", *names], iou, miou))
    return {"miou": miou, "num_images": len(ids),
            "per_class": {n: (None if np.isnan(v) else float(v))
                          for n, v in zip(["background", *names], iou)}}


def demo(out: Path, train: bool = False, eval_num: int = 100,
         train_num: int | None = None) -> dict:
    """Run the demo (module docstring); returns the mIoU report."""
    start = time.perf_counter()
    checkpoint = _checkpoint(out, train, train_num)
    bundle, data, run = out / "bundle", out / "data", out / "run"
    if _bundle_is_current(bundle, checkpoint):
        print(f"bundle {bundle} is up to date with {checkpoint.name}")
    else:
        _run(["segclip-export", "onnx", str(checkpoint), "--out", str(bundle)])
        shutil.rmtree(run, ignore_errors=True)  # results of an older bundle
    eval_set = data / "eval"
    if not (eval_set / "classes.txt").is_file():
        shutil.rmtree(data, ignore_errors=True)
        _run(["segclip-data", "synth", str(data), "--num", "0", "--val-num", "0", "--eval-num",
              str(eval_num), "--quiet"])
    threshold = _threshold(checkpoint)
    extra = ["--threshold", f"{threshold}"] if threshold is not None else []
    _run(["segclip-run", "--engine", str(bundle), "--labels", str(eval_set / "classes.txt"),
          "--out", str(run), "--skip-existing", *extra, str(eval_set / "JPEGImages")])
    report = _miou(eval_set, run)
    (out / "miou.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"demo: mIoU {100 * report['miou']:.2f}% on {report['num_images']} held-out synthetic "
          f"images; label maps and overlays in {run}/ ({time.perf_counter() - start:.0f} s)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--train", action="store_true", help="train the tiny model first")
    parser.add_argument("--eval-num", type=int, default=100, help="held-out eval images")
    parser.add_argument("--train-num", type=int, default=None,
                        help="training pairs for --train (default: the script's)")
    args = parser.parse_args(argv)
    try:
        demo(args.out, args.train, args.eval_num, args.train_num)
    except SegclipError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
