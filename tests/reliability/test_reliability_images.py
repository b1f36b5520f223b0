"""Bad input, images: every command that reads images (segclip-run, segclip-eval with a checkpoint
or a bundle, segclip-train) answers a 0-byte, truncated or non-image file with one `error:` line,
exit code 2, no traceback and no output for it; and segments (or trains on) a 1x1, 16-bit,
CMYK, animated, RGBA or palette image like any other, since docs/architecture.md accepts any size
and mode.
Decompression bombs are in test_reliability_limits.py (and, for segclip-data, here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _reliability_support import assert_user_error, entries, invoke, png_bomb, write_image
from PIL import Image

BAD = {"zero_bytes": ".png", "truncated_png": ".png", "truncated_jpeg": ".jpg",
       "not_an_image": ".png"}
ODD = {"one_pixel": ".png", "sixteen_bit": ".png", "cmyk": ".jpg", "animated": ".gif",
       "rgba": ".png", "palette": ".png"}
# fragment of the runtime's message for each bad kind
RUN_MESSAGES = {"zero_bytes": "is empty (0 bytes)", "truncated_png": "truncated or corrupt",
                "truncated_jpeg": "truncated or corrupt", "not_an_image": "as an image"}


@pytest.fixture
def labels_file(tmp_path: Path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("red square\nblue circle\ngreen triangle\n")
    return path


def _run(bundle: Path, labels: Path, out: Path, *images: Path) -> object:
    from segclip.runtime.cli import app

    return invoke(app, ["--engine", bundle, "--labels", labels, "--out", out, "--device", "cpu",
                        "--quiet", *images])


# ---- segclip-run --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(BAD))
def test_run_refuses_a_bad_image_in_one_line(kind: str, tmp_path: Path, rel_bundle: Path,
                                             labels_file: Path) -> None:
    image = write_image(kind, tmp_path / f"photo{BAD[kind]}")
    out = tmp_path / "out"
    result = _run(rel_bundle, labels_file, out, image)
    assert_user_error(result, RUN_MESSAGES[kind], str(image))
    assert entries(out) == []


@pytest.mark.parametrize("kind", sorted(BAD))
def test_run_skips_a_bad_image_among_good_ones(kind: str, tmp_path: Path, rel_bundle: Path,
                                               labels_file: Path) -> None:
    (tmp_path / "in").mkdir()
    bad = write_image(kind, tmp_path / "in" / f"bad{BAD[kind]}")
    good = write_image("rgb", tmp_path / "in" / "good.png")
    out = tmp_path / "out"
    result = _run(rel_bundle, labels_file, out, good, bad)
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = result.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in errors), errors
    assert any(str(bad) in line and RUN_MESSAGES[kind] in line for line in errors), errors
    assert entries(out) == ["good.json", "good.png", "good_overlay.jpg"]


@pytest.mark.parametrize("kind", sorted(ODD))
def test_run_segments_any_size_and_mode(kind: str, tmp_path: Path, rel_bundle: Path,
                                        labels_file: Path) -> None:
    image = write_image(kind, tmp_path / f"photo{ODD[kind]}")
    with Image.open(image) as opened:
        width, height = opened.size
    out = tmp_path / "out"
    result = _run(rel_bundle, labels_file, out, image)
    assert result.exit_code == 0, result.output
    assert result.user_warnings == [], result.user_warnings
    assert entries(out) == ["photo.json", "photo.png", "photo_overlay.jpg"]
    report = json.loads((out / "photo.json").read_text())
    assert (report["width"], report["height"]) == (width, height)
    assert sum(report["counts"].values()) == width * height
    with Image.open(out / "photo.png") as label_map:
        assert label_map.size == (width, height)
        assert np.asarray(label_map).max() <= 3


def test_segmenter_accepts_every_mode_and_size(tmp_path: Path, rel_bundle: Path) -> None:
    """The same kinds through the Python API, from a path and from the opened PIL image."""
    from segclip.runtime import Segmenter

    segmenter = Segmenter(rel_bundle, device="cpu")
    for kind, suffix in ODD.items():
        path = write_image(kind, tmp_path / f"{kind}{suffix}")
        with Image.open(path) as opened:
            size = opened.size
            from_pil = segmenter.segment(opened, ["cat", "dog"]).label_map
        from_path = segmenter.segment(path, ["cat", "dog"]).label_map
        assert from_path.shape == (size[1], size[0]) and from_path.dtype == np.uint16, kind
        np.testing.assert_array_equal(from_path, from_pil, err_msg=kind)


# ---- segclip-eval (checkpoint and bundle) on a VOC set holding the image ----------------------
def _voc_with(kind: str, world: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the synthetic val set whose first image is replaced by one of `kind`."""
    root = Path(shutil.copytree(world / "val", tmp_path / "voc"))
    first = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    for old in (root / "JPEGImages").glob(f"{first}.*"):
        old.unlink()
    suffix = {**BAD, **ODD}[kind]
    suffix = ".jpg" if suffix == ".jpg" else ".png"  # the VOC layout's suffixes
    image = root / "JPEGImages" / f"{first}{suffix}"
    write_image(kind, image)
    size = (48, 40)  # write_image's default (width, height)
    if kind in ODD:
        with Image.open(image) as opened:
            size = opened.size
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[: size[1] // 2] = 1
    Image.fromarray(mask, "L").save(root / "SegmentationClass" / f"{first}.png")
    return root, str(image)


@pytest.mark.parametrize("model", ["checkpoint", "bundle"])
@pytest.mark.parametrize("kind", sorted({**BAD, **ODD}))
def test_eval_on_a_set_holding_the_image(kind: str, model: str, tmp_path: Path,
                                         tiny_checkpoint: Path, rel_bundle: Path,
                                         synth_world: Path) -> None:
    from segclip.cli.evaluate import app

    root, image = _voc_with(kind, synth_world, tmp_path)
    out = tmp_path / "res" / "eval.json"
    result = invoke(app, [tiny_checkpoint if model == "checkpoint" else rel_bundle, "--data", root,
                          "--classes", synth_world / "classes.txt", "--out", out, "--quiet"])
    if kind in BAD:
        assert_user_error(result, image)
        assert not (tmp_path / "res").exists()
    else:
        assert result.exit_code == 0, result.output
        assert result.user_warnings == [], result.user_warnings
        assert json.loads(out.read_text())["num_images"] == 4


# ---- segclip-train on pairs holding the image ---------------------------------------------------
def _pairs_with(kind: str, tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = []
    for index in range(4):
        name = f"img{index}{({**BAD, **ODD}.get(kind, '.png')) if index == 0 else '.png'}"
        write_image(kind if index == 0 else "rgb", folder / name)
        rows.append(json.dumps({"image": name, "caption": f"a photo of shape {index}"}))
    (folder / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    return folder / "pairs.jsonl", folder / f"img0{({**BAD, **ODD}).get(kind, '.png')}"


def _train(pairs: Path, out: Path, workers: int) -> object:
    from segclip.cli.train import app

    return invoke(app, ["--config", "tiny", "--recipe", "synth", "--data", pairs, "--out", out,
                        "--steps", "1", "--batch-size", "4", "--workers", str(workers),
                        "--set", "superpixel_kl_weight=0", "--quiet"])


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("kind", sorted(BAD))
def test_train_refuses_a_bad_image_in_one_line(kind: str, workers: int,
                                               tmp_path: Path) -> None:
    """Also with DataLoader worker processes, whose errors torch re-raises with the worker's
    traceback text inside the message."""
    pairs, image = _pairs_with(kind, tmp_path)
    out = tmp_path / "run"
    assert_user_error(_train(pairs, out, workers), str(image))
    assert entries(out) == []


@pytest.mark.parametrize("kind", sorted(ODD))
def test_train_accepts_any_size_and_mode(kind: str, tmp_path: Path) -> None:
    pairs, _ = _pairs_with(kind, tmp_path)
    result = _train(pairs, tmp_path / "run", workers=0)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "ckpt.pt").is_file()


# ---- segclip-data superpixels (reads the same training images) ----------------------------------
@pytest.mark.parametrize("kind", [*sorted(BAD), "bomb"])
def test_superpixels_refuse_a_bad_image_in_one_line(kind: str, tmp_path: Path) -> None:
    from segclip.cli.data import app

    pairs, image = _pairs_with("rgb" if kind == "bomb" else kind, tmp_path)
    if kind == "bomb":
        image = png_bomb(tmp_path / "pairs" / "img0.png", 12_000, 10_000)
    result = invoke(app, ["superpixels", pairs, "--quiet"])
    assert_user_error(result, str(image))
    assert not list((tmp_path / "pairs" / "superpixels").rglob("img0*"))
