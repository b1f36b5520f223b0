"""Faults, segclip-run killed midway: SIGKILL at seeded-random moments and while a result file
is being written leaves only complete outputs (every NAME.json has a complete NAME.png and
NAME_overlay.jpg; every visible image file decodes), and `--skip-existing` then finishes the
rest without redoing finished images, giving the same files as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
NUM_IMAGES = 64


def _run_command(bundle: Path, labels: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    code = "import sys; from segclip.runtime.cli import app; sys.exit(app())"
    return [sys.executable, "-c", code, "--engine", str(bundle), "--labels", str(labels),
            "--out", str(out), "--device", "cpu", "--quiet", *extra, str(folder)]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("run_faults") / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(NUM_IMAGES):
        height, width = int(rng.integers(500, 700)), int(rng.integers(600, 900))
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        pixels[height // 3:, : width // 2] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(folder / f"img{index:03d}.png")
    labels = folder.parent / "labels.txt"
    labels.write_text("red square\nblue circle\ngreen triangle\n")
    return folder, labels


def _check_only_complete_outputs(out: Path, folder: Path) -> int:
    """Assert the invariant; return how many complete triples there are."""
    complete = 0
    for path in sorted(out.iterdir()):
        if path.name.startswith("."):
            continue  # a temp file of a killed write: never under a result name
        if path.suffix in (".png", ".jpg"):
            with Image.open(path) as image:
                image.load()  # raises on a truncated file
        if path.suffix == ".json":
            name = path.stem
            report = json.loads(path.read_text())
            label_png, overlay = out / f"{name}.png", out / f"{name}_overlay.jpg"
            assert label_png.is_file() and overlay.is_file(), name
            with Image.open(folder / f"{name}.png") as source, Image.open(label_png) as labels:
                assert labels.size == source.size == (report["width"], report["height"])
            complete += 1
    return complete


def _without_timings(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("timings_ms", "backend_info")}


def test_killed_run_leaves_only_complete_outputs_and_skip_existing_finishes(
        photo_folder: tuple[Path, Path], rel_bundle: Path, tmp_path: Path) -> None:
    folder, labels = photo_folder
    reference = tmp_path / "reference"
    started = time.monotonic()
    clean = subprocess.Popen(_run_command(rel_bundle, labels, folder, reference), env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    while clean.poll() is None:
        if first is None and reference.is_dir() and list(reference.glob("*.json")):
            first = time.monotonic() - started  # startup done, results flowing
        time.sleep(0.005)
    total = time.monotonic() - started
    assert clean.returncode == 0, clean.stderr.read().decode()
    clean.stderr.close()
    first = first or total / 2

    out = tmp_path / "out"
    rng = random.Random(11)
    history, midway = [], 0
    for attempt in range(4):
        process = subprocess.Popen(_run_command(rel_bundle, labels, folder, out,
                                                "--skip-existing"),
                                   env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start = time.monotonic()
        if attempt % 2:  # at a random moment while results are being produced
            delay = rng.uniform(first, first + 0.5 * (total - first))
            while process.poll() is None and time.monotonic() - start < delay:
                time.sleep(0.005)
            what = f"at {delay:.2f} s"
        else:  # while a result file is being written (its hidden temp file exists)
            skip, seen, what = rng.randint(0, 15), 0, "process ended first"
            stale = set(out.glob(".*.tmp")) if out.is_dir() else set()  # from earlier kills
            while process.poll() is None and time.monotonic() - start < 120:
                temps = sorted(set(out.glob(".*.tmp")) - stale) if out.is_dir() else []
                if temps:
                    seen += 1
                    if seen > skip:
                        what = f"during {temps[0].name}"
                        break
                time.sleep(0.001)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        stderr = process.stderr.read().decode(errors="replace")
        process.stderr.close()
        assert "Traceback" not in stderr, stderr
        done = _check_only_complete_outputs(out, folder) if out.is_dir() else 0
        midway += process.returncode == -signal.SIGKILL and done < NUM_IMAGES
        history.append(f"attempt {attempt}: {what}, rc {process.returncode}, {done} complete")
    assert midway >= 2, f"too few kills landed mid-run: {history}"

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".json"}
    finish = subprocess.run(_run_command(rel_bundle, labels, folder, out, "--skip-existing"),
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert finish.returncode == 0, f"{finish.stderr}\n{history}"
    assert _check_only_complete_outputs(out, folder) == NUM_IMAGES
    for name, stamp in stamps.items():  # finished images were skipped, not redone
        assert (out / name).stat().st_mtime_ns == stamp, name
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == sorted(p.name for p in reference.iterdir())
    for name in visible:
        if name.endswith(".json"):
            got = _without_timings(json.loads((out / name).read_text()))
            want = _without_timings(json.loads((reference / name).read_text()))
            assert got == want, name
        elif not name.endswith("_overlay.jpg"):
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
