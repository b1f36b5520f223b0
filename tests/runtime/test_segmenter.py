"""segclip.runtime.segmenter: the Segmenter on the tiny bundle — label-map contract, label
caching, agreement with the PyTorch protocol, batching and thread safety."""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from segclip.runtime import LabelTruncatedWarning, Segmenter
from segclip.runtime.assign import assign_windows, region_labels, region_scores
from segclip.runtime.errors import EngineError, ImageError, LabelFileError
from segclip.runtime.images import preprocess

LABELS = ["red square", "blue circle", "green triangle", "yellow star", "cat"]
SIZES = [(64, 64), (96, 128), (50, 80), (200, 90), (64, 200), (160, 240)]


def shapes_image(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8: a flat background with four random filled ellipses/rectangles."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1 = x0 + int(rng.integers(8, width // 2 + 8))
        y1 = y0 + int(rng.integers(8, height // 2 + 8))
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return np.asarray(image)


@pytest.fixture(scope="module")
def segmenter(tiny_bundle: Path) -> Segmenter:
    return Segmenter(tiny_bundle, device="cpu")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [shapes_image(h, w, seed=h * w) for h, w in SIZES]


def test_label_map_contract(segmenter: Segmenter, images: list[np.ndarray]) -> None:
    for image in images:
        result = segmenter.segment(image, LABELS)
        height, width = image.shape[:2]
        assert result.label_map.shape == (height, width) == result.size
        assert result.label_map.dtype == np.uint16
        assert result.label_map.max() <= len(LABELS)
        assert result.labels == tuple(LABELS)
        assert list(result.counts) == ["background", *LABELS]
        assert sum(result.counts.values()) == height * width
        assert sum(result.fractions.values()) == pytest.approx(1.0, abs=1e-9)
        for value, name in enumerate(["background", *LABELS]):
            assert result.counts[name] == int((result.label_map == value).sum())
        assert set(result.timings) == {"preprocess", "image", "text", "assign", "total"}
        assert result.backend == "onnxruntime/CPUExecutionProvider"


def test_sources_give_the_same_result(segmenter: Segmenter, images: list[np.ndarray],
                                      tmp_path: Path) -> None:
    image = images[1]
    Image.fromarray(image).save(tmp_path / "image.png")
    from_array = segmenter.segment(image, LABELS).label_map
    from_pil = segmenter.segment(Image.fromarray(image), LABELS).label_map
    from_path = segmenter.segment(tmp_path / "image.png", LABELS).label_map
    from_file = segmenter.segment(str(tmp_path / "image.png"), LABELS).label_map
    assert (from_array == from_pil).all() and (from_array == from_path).all()
    assert (from_array == from_file).all()


def test_threshold_controls_background(segmenter: Segmenter, images: list[np.ndarray]) -> None:
    image = images[5]
    assert (segmenter.segment(image, LABELS, threshold=0.0).label_map > 0).all()
    strict = segmenter.segment(image, LABELS, threshold=1.0).label_map
    assert (strict > 0).any()  # the best region always keeps its label (cutoff <= max P)
    with pytest.raises(EngineError, match=r"threshold must be in \[0, 1\], got 1.5"):
        segmenter.segment(image, LABELS, threshold=1.5)


def test_text_engine_runs_once_per_label_set(tiny_bundle: Path, images: list[np.ndarray]) -> None:
    seg = Segmenter(tiny_bundle, device="cpu")
    calls = []
    run_text = seg._backend.run_text
    seg._backend.run_text = lambda tokens: calls.append(tokens.shape) or run_text(tokens)
    first = seg.segment(images[0], LABELS)
    second = seg.segment(images[1], LABELS)
    assert calls == [(5, 77)] and first.timings["text"] > 0 and second.timings["text"] == 0
    seg.segment(images[0], LABELS[:2])
    seg.segment(images[2], tuple(LABELS[:2]))
    seg.segment_batch(images[:3], LABELS)
    assert calls == [(5, 77), (2, 77)] and seg.text_engine_calls == 2


def test_concurrent_first_use_computes_once(tiny_bundle: Path) -> None:
    seg = Segmenter(tiny_bundle, device="cpu")
    barrier = threading.Barrier(8)
    results: list[np.ndarray] = []

    def worker() -> None:
        barrier.wait()
        results.append(seg.embed_labels(LABELS))

    with ThreadPoolExecutor(8) as pool:  # re-raises a worker's exception
        for done in [pool.submit(worker) for _ in range(8)]:
            done.result()
    assert seg.text_engine_calls == 1 and len(results) == 8
    assert all(r is results[0] for r in results)


def test_disk_cache(tiny_bundle: Path, tmp_path: Path) -> None:
    first = Segmenter(tiny_bundle, device="cpu", cache_dir=tmp_path / "cache")
    embeddings = first.embed_labels(LABELS)
    files = list((tmp_path / "cache").rglob("*.npy"))
    assert len(files) == 1 and not list((tmp_path / "cache").rglob("*.tmp"))
    second = Segmenter(tiny_bundle, device="cpu", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(second.embed_labels(LABELS), embeddings)
    assert second.text_engine_calls == 0
    files[0].write_bytes(b"corrupt")
    third = Segmenter(tiny_bundle, device="cpu", cache_dir=tmp_path / "cache")
    with pytest.warns(RuntimeWarning, match="ignoring unreadable embedding cache file"):
        np.testing.assert_array_equal(third.embed_labels(LABELS), embeddings)
    assert third.text_engine_calls == 1


def test_long_label_is_truncated_with_a_warning(segmenter: Segmenter) -> None:
    long_label = " ".join(["enormous"] * 90)
    with pytest.warns(LabelTruncatedWarning, match=r"label 'enormous enormous .* needs \d+ "
                                                   r"tokens .* more than the text context of 77"):
        embeddings = segmenter.embed_labels(["cat", long_label])
    assert embeddings.shape == (2, 64) and np.isfinite(embeddings).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LabelTruncatedWarning)
        segmenter.embed_labels(["cat", "dog"])  # no warning for short labels


def test_label_errors(segmenter: Segmenter, images: list[np.ndarray], tmp_path: Path) -> None:
    with pytest.raises(LabelFileError, match=r"'background' is reserved for value 0"):
        segmenter.segment(images[0], ["cat", "Background"])
    with pytest.raises(LabelFileError, match=r"holds no labels"):
        segmenter.segment(images[0], [])
    (tmp_path / "labels.txt").write_text("# only a comment\n")
    with pytest.raises(LabelFileError, match=r"labels\.txt holds no labels"):
        segmenter.segment(images[0], tmp_path / "labels.txt")
    with pytest.raises(ImageError, match=r"does not exist"):
        segmenter.segment(tmp_path / "missing.png", LABELS)


def test_max_pixels(tiny_bundle: Path, images: list[np.ndarray]) -> None:
    seg = Segmenter(tiny_bundle, device="cpu", max_pixels=5000)
    with pytest.raises(ImageError, match=r"over the limit of 5,000"):
        seg.segment(images[1], LABELS)


def test_batching_does_not_change_results(tiny_bundle: Path, segmenter: Segmenter,
                                          images: list[np.ndarray]) -> None:
    single = Segmenter(tiny_bundle, device="cpu", batch_size=1)
    expected = [segmenter.segment(image, LABELS).label_map for image in images]
    batched = segmenter.segment_batch(images, LABELS)
    one_by_one = [single.segment(image, LABELS).label_map for image in images]
    for want, got, alone in zip(expected, batched, one_by_one):
        assert (got.label_map == want).all() and (alone == want).all()
    with pytest.raises(EngineError, match=r"batch_size 0 is outside"):
        Segmenter(tiny_bundle, device="cpu", batch_size=0)


def test_thread_safety(segmenter: Segmenter, images: list[np.ndarray]) -> None:
    expected = [segmenter.segment(image, LABELS).label_map for image in images]
    barrier = threading.Barrier(8)
    failures: list[str] = []

    def worker(index: int) -> None:
        barrier.wait()
        for step in range(6):
            which = (index + step) % len(images)
            got = segmenter.segment(images[which], LABELS).label_map
            if not (got == expected[which]).all():
                failures.append(f"thread {index} image {which}")

    with ThreadPoolExecutor(8) as pool:  # re-raises a worker's exception
        list(pool.map(worker, range(8)))
    assert not failures


def test_matches_the_pytorch_protocol(segmenter: Segmenter, images: list[np.ndarray],
                                      tiny_bundle_model: Any) -> None:
    """The runtime's label maps agree with segclip.evaluation's PyTorch protocol (official:
    scores averaged in window overlaps and resampled) on >= 99% of all pixels; they differ by
    definition only along label borders and in overlap strips (runtime/assign.py docstring)."""
    from segclip.evaluation.protocol import Protocol, encode_labels, predict

    text = encode_labels(tiny_bundle_model, LABELS)
    protocol = Protocol(window=64, threshold=segmenter.threshold)
    agree = total = 0
    for image in images:
        ours = segmenter.segment(image, LABELS).label_map
        reference = predict(tiny_bundle_model, image, text, protocol).label_map.numpy()
        same = int((ours == reference).sum())
        assert same / ours.size >= 0.95, image.shape
        agree, total = agree + same, total + ours.size
    assert agree / total >= 0.99


def test_matches_torch_towers_with_the_same_assignment(segmenter: Segmenter,
                                                       images: list[np.ndarray],
                                                       tiny_bundle_model: Any) -> None:
    """Engine parity in isolation: torch's encode_image on the runtime's own windows, then the
    same numpy assignment, gives the same label maps (>= 99.9% of pixels per image)."""
    import torch

    from segclip.evaluation.protocol import encode_labels

    text = encode_labels(tiny_bundle_model, LABELS).numpy()
    bundle = segmenter.bundle
    for image in images:
        prepared = preprocess(image, bundle.image_size, bundle.mean, bundle.std)
        with torch.no_grad():
            out = tiny_bundle_model.encode_image(torch.from_numpy(prepared.windows))
        scores = region_scores(out.regions.numpy(), out.global_embedding.numpy(), text,
                               bundle.logit_scale, bundle.top_k)
        table = region_labels(scores, segmenter.threshold)
        reference = assign_windows(out.assign.numpy(), table, prepared.resized_hw,
                                   prepared.window, prepared.original_hw)
        ours = segmenter.segment(image, LABELS).label_map
        assert (ours == reference).mean() >= 0.999, image.shape
