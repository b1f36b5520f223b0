"""Concurrent load: one `Segmenter` shared by 8 threads over 200 images gives exactly the
sequential results; 5,000 consecutive `segment` calls grow resident memory by < 5% after warm-up
(marked `slow`; opt in with `-m slow`).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LABELS = ["red square", "blue circle", "green triangle", "yellow star", "cat"]


def _images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Shapes on flat backgrounds, of varied sizes and aspect ratios (1 to 3 windows)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        height, width = int(rng.integers(24, 160)), int(rng.integers(24, 200))
        pixels = np.empty((height, width, 3), np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        pixels[y0: y0 + height // 3, x0: x0 + width // 3] = rng.integers(0, 256, 3)
        images.append(pixels)
    return images


def test_one_segmenter_from_8_threads_on_200_images_equals_sequential(rel_bundle: Path) -> None:
    from segclip.runtime import Segmenter

    images = _images(200)
    segmenter = Segmenter(rel_bundle, device="cpu")
    expected = [segmenter.segment(image, LABELS).label_map for image in images]
    assert len({m.tobytes() for m in expected}) > 20  # the results differ between images

    shared = Segmenter(rel_bundle, device="cpu")  # fresh: its label cache is filled under load
    work: queue.Queue[int] = queue.Queue()
    for index in range(len(images)):
        work.put(index)
    got: dict[int, np.ndarray] = {}
    errors: list[str] = []
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        while True:
            try:
                index = work.get_nowait()
            except queue.Empty:
                return
            try:
                got[index] = shared.segment(images[index], LABELS).label_map
            except Exception as e:  # reported below with the image index
                errors.append(f"image {index}: {e!r}")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert errors == [] and len(got) == len(images)
    different = [i for i, want in enumerate(expected) if not np.array_equal(got[i], want)]
    assert different == [], f"threaded results differ for images {different[:10]}"
    assert shared.text_engine_calls == 1  # the label set was embedded once, not per thread


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from segclip.runtime import Segmenter

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    calls, warmup = int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (int(rng.integers(40, 100)), int(rng.integers(40, 140)), 3),
                           dtype=np.uint8) for _ in range(16)]
    label_sets = [["red square", "blue circle", "cat"], ["dog", "tree"], ["sky"]]
    segmenter = Segmenter(sys.argv[1], device="cpu")
    samples = []
    start = time.perf_counter()
    for call in range(calls):
        segmenter.segment(images[call % len(images)], label_sets[call % len(label_sets)])
        if call + 1 == warmup or (call + 1) % 500 == 0:
            samples.append((call + 1, rss_mb()))
    print(json.dumps({"seconds": time.perf_counter() - start, "samples": samples}))
""")


@pytest.mark.slow
def test_5000_segment_calls_do_not_grow_memory(rel_bundle: Path) -> None:
    calls, warmup = 5_000, 200
    child = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(rel_bundle), str(calls),
                            str(warmup)], capture_output=True, text=True, timeout=1200,
                           env=ENV)
    assert child.returncode == 0, child.stderr[-2000:]
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    samples = dict(figures["samples"])
    baseline, final = samples[warmup], samples[calls]
    growth = (final - baseline) / baseline
    assert growth < 0.05, (f"resident memory grew {100 * growth:.1f}% ({baseline:.0f} -> "
                           f"{final:.0f} MB) over {calls} calls: {figures}")
