"""segclip.runtime.backends.tensorrt on a real GPU: engines built by segclip-export trt, parity
with ONNX Runtime CPU, batching past the profile, the CUDA assignment path and per-thread
contexts. Needs tensorrt, cuda-python, torch with CUDA (for the builder) and a GPU; skipped
elsewhere (the CPU-side checks of engine metadata are in test_runtime_bundle/test_backends)."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
pytest.importorskip("tensorrt")
pytest.importorskip("segclip.runtime.backends.tensorrt")  # cuda-python

LABELS = ["red square", "blue circle", "green triangle", "cat"]


@pytest.fixture(scope="module")
def trt_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segclip.errors import MissingDependencyError
    from segclip.export.tensorrt_build import Profile, build_engines

    root = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(tiny_bundle, root)
    try:  # min batch 2: single-window images exercise the padded path
        build_engines(root, batch=Profile(2, 4, 4), labels=Profile(1, 4, 8))
    except MissingDependencyError as e:
        pytest.skip(str(e))
    return root


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (90, 140), (64, 500), (300, 200)]  # 1, 2, 8 and 15 windows
    out = []
    for height, width in sizes:
        image = np.zeros((height, width, 3), np.uint8)
        image[:] = rng.integers(0, 255, 3)
        image[height // 4: 3 * height // 4, width // 5: width // 2] = rng.integers(0, 255, 3)
        out.append(image)
    return out


def test_auto_selects_tensorrt(trt_bundle: Path) -> None:
    from segclip.runtime.backends import create_backend

    backend = create_backend(trt_bundle, "auto")
    info = backend.info()
    assert backend.name == "tensorrt" and info["image"] == "image.plan"
    assert info["batch_profile"] == [2, 4] and backend.max_batch == 4
    assert create_backend(trt_bundle / "image.plan", "cuda").name == "tensorrt"


def test_parity_with_onnxruntime_cpu(trt_bundle: Path) -> None:
    from segclip.runtime.backends import create_backend

    trt_backend, cpu = create_backend(trt_bundle, "cuda"), create_backend(trt_bundle, "cpu")
    windows = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    got, want = trt_backend.run_image(windows), cpu.run_image(windows)
    for name in ("global_", "regions", "assign"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=2e-3)
    tokens = np.zeros((11, 77), np.int64)  # more labels than the text profile's max (8)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49406, np.arange(11) + 320, 49407
    np.testing.assert_allclose(trt_backend.run_text(tokens), cpu.run_text(tokens), atol=2e-3)


def test_segmenter_on_tensorrt_matches_cpu(trt_bundle: Path) -> None:
    from segclip.runtime import Segmenter

    gpu, cpu = Segmenter(trt_bundle, device="cuda"), Segmenter(trt_bundle, device="cpu")
    assert gpu.backend_info["assign"] == "cuda" and gpu.batch_size == 4
    for image in images():
        ours, reference = gpu.segment(image, LABELS), cpu.segment(image, LABELS)
        assert ours.label_map.shape == image.shape[:2]
        assert (ours.label_map == reference.label_map).mean() >= 0.999


def test_threads_use_their_own_contexts(trt_bundle: Path) -> None:
    from segclip.runtime import Segmenter

    seg = Segmenter(trt_bundle, device="cuda")
    inputs = images()
    expected = [seg.segment(image, LABELS).label_map for image in inputs]
    failures: list[str] = []
    barrier = threading.Barrier(8)

    def worker(index: int) -> None:
        barrier.wait()
        for step in range(4):
            which = (index + step) % len(inputs)
            if not (seg.segment(inputs[which], LABELS).label_map == expected[which]).all():
                failures.append(f"thread {index} image {which}")

    with ThreadPoolExecutor(8) as pool:  # re-raises a worker's exception
        list(pool.map(worker, range(8)))
    seg.close()
    assert not failures
