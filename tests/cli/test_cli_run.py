"""`segclip-run` through typer's CliRunner on the tiny bundle: result triples, palette PNGs,
JSON sums, skip-existing, safe output names, and one-line errors with exit code 2 that write
nothing (docs/architecture.md "Command contracts")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from typer.testing import CliRunner

from segclip.runtime.cli import app
from segclip.runtime.runner import plan_outputs, sanitize_name
from segclip.runtime.visualize import palette

runner = CliRunner()
LABELS = ["red square", "blue circle", "cat"]


def make_image(path: Path, height: int, width: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:] = rng.integers(0, 255, 3)
    pixels[height // 4: height // 2, width // 3: 2 * width // 3] = rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "labels.txt").write_text("# classes\n" + "\n".join(LABELS) + "\n")
    return {"labels": tmp_path / "labels.txt",
            "a": make_image(tmp_path / "photos" / "street.png", 90, 140, 0),
            "b": make_image(tmp_path / "photos" / "my photo (1).jpg", 64, 64, 1),
            "c": make_image(tmp_path / "more" / "street.png", 120, 70, 2)}


def invoke(bundle: Path, labels: Path, out: Path, *args: str) -> object:
    return runner.invoke(app, ["--engine", str(bundle), "--labels", str(labels), "--out",
                               str(out), "--quiet", *args])


def one_line_error(result: object) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert lines[0].startswith("error: ")
    return lines[0]


def test_end_to_end(tiny_bundle: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(tiny_bundle, inputs["labels"], out, str(inputs["a"].parent),
                    str(inputs["c"]))
    assert result.exit_code == 0, result.output
    names = {"street": inputs["a"], "my_photo_1_": inputs["b"], "street_2": inputs["c"]}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}{suffix}" for n in names for suffix in (".png", "_overlay.jpg", ".json"))
    for name, source in names.items():
        width, height = Image.open(source).size
        with Image.open(out / f"{name}.png") as png:
            assert png.size == (width, height) and png.mode == "P"
            colours = np.asarray(png.getpalette()[:3 * (len(LABELS) + 1)], np.uint8)
            np.testing.assert_array_equal(colours.reshape(-1, 3), palette(len(LABELS) + 1))
            values = np.asarray(png)
        assert values.max() <= len(LABELS)
        report = json.loads((out / f"{name}.json").read_text())
        assert report["image"] == str(source) and (report["width"], report["height"]) == (
            width, height)
        assert report["labels"] == LABELS and list(report["counts"]) == ["background", *LABELS]
        assert sum(report["counts"].values()) == width * height
        assert sum(report["fractions"].values()) == pytest.approx(1.0, abs=1e-9)
        for value, label in enumerate(["background", *LABELS]):
            assert report["counts"][label] == int((values == value).sum())
        assert {"load", "preprocess", "image", "text", "assign", "total"} <= set(
            report["timings_ms"])
        assert report["backend"] == "onnxruntime/CPUExecutionProvider"
        assert report["files"] == {"label_map": f"{name}.png", "overlay": f"{name}_overlay.jpg"}
        with Image.open(out / f"{name}_overlay.jpg") as overlay:
            assert overlay.format == "JPEG" and overlay.width > width  # image + legend panel
            assert overlay.height >= height
    assert "onnxruntime/CPUExecutionProvider" in result.stdout
    assert "images" in result.stdout and "mean ms" in result.stdout


def test_threshold_and_engine_file(tiny_bundle: Path, inputs: dict[str, Path],
                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(tiny_bundle / "image.fp16.onnx", inputs["labels"], out, "--threshold", "0",
                    str(inputs["a"]))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "street.json").read_text())
    assert report["counts"]["background"] == 0 and report["threshold"] == 0.0
    assert report["backend_info"]["image"] == "image.fp16.onnx"


def test_skip_existing(tiny_bundle: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    folder = str(inputs["a"].parent)
    assert invoke(tiny_bundle, inputs["labels"], out, folder).exit_code == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "street.json").unlink()  # an incomplete triple is redone
    result = invoke(tiny_bundle, inputs["labels"], out, "--skip-existing", folder)
    assert result.exit_code == 0, result.output
    assert (out / "street.json").is_file()
    assert (out / "my_photo_1_.png").stat().st_mtime_ns == stamps["my_photo_1_.png"]
    assert (out / "street.png").stat().st_mtime_ns != stamps["street.png"]
    lines = result.stdout.splitlines()
    assert lines[1].split()[:4] == ["2", "1", "1", "0"]  # images, done, skipped, failed


def test_output_names_never_escape(tmp_path: Path) -> None:
    assert sanitize_name("../x") == "_x"
    assert sanitize_name("..") == "image" and sanitize_name("") == "image"
    assert sanitize_name(".hidden") == "hidden"
    assert sanitize_name("a/b\\c:d*e?") == "a_b_c_d_e_"
    assert sanitize_name("chat été") == "chat_été"
    out = tmp_path / "out"
    images = [tmp_path / "x" / ".." / "y.png", tmp_path / "z" / "Y.png", tmp_path / "q" / "...png"]
    items = plan_outputs(images, out)
    assert [i.name for i in items] == ["y", "Y_2", "image"]
    for item in items:
        for path in item.files:
            assert path.parent == out and os.sep not in path.name


def test_never_overwrites_an_input(tiny_bundle: Path, inputs: dict[str, Path],
                                   tmp_path: Path) -> None:
    out = inputs["a"].parent  # writing into the folder that holds street.png
    result = invoke(tiny_bundle, inputs["labels"], out, str(inputs["a"]))
    assert result.exit_code == 0, result.output
    assert (out / "street_2.png").is_file() and (out / "street_2.json").is_file()
    with Image.open(inputs["a"]) as original:
        assert original.mode == "RGB"  # the input image is untouched


def test_bad_image_among_good_ones(tiny_bundle: Path, inputs: dict[str, Path],
                                   tmp_path: Path) -> None:
    (inputs["a"].parent / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    result = invoke(tiny_bundle, inputs["labels"], out, str(inputs["a"].parent))
    assert result.exit_code == 2, result.output
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and "broken.png" in errors[0] and "skipped" in errors[0]
    assert errors[1] == "error: 1 of 3 images failed (listed above)"
    assert not list(out.glob("broken*"))
    assert (out / "street.json").is_file() and (out / "my_photo_1_.json").is_file()
    assert "Traceback" not in result.output and "images" in result.stdout


def test_too_large_image_is_reported(tiny_bundle: Path, inputs: dict[str, Path],
                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(tiny_bundle, inputs["labels"], out, "--max-pixels", "5000",
                    str(inputs["a"]), str(inputs["b"]))
    assert result.exit_code == 2
    assert "over the limit of 5,000" in result.stderr
    assert not (out / "street.png").exists() and (out / "my_photo_1_.json").is_file()


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime has CUDA")
def test_device_cuda_on_a_cpu_machine(tiny_bundle: Path, inputs: dict[str, Path],
                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(tiny_bundle, inputs["labels"], out, "--device", "cuda", str(inputs["a"]))
    line = one_line_error(result)
    assert "device 'cuda' is not available" in line and "pip install 'segclip[gpu]'" in line
    assert not out.exists()


def test_user_errors_write_nothing(tiny_bundle: Path, inputs: dict[str, Path],
                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    image = str(inputs["a"])
    line = one_line_error(invoke(tiny_bundle, tmp_path / "missing.txt", out, image))
    assert "labels file" in line and "does not exist" in line
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    assert "holds no labels" in one_line_error(invoke(tiny_bundle, tmp_path / "empty.txt", out,
                                                      image))
    line = one_line_error(invoke(tmp_path / "photos", inputs["labels"], out, image))
    assert "is not a segclip bundle" in line and "segclip-export onnx" in line
    line = one_line_error(invoke(tiny_bundle, inputs["labels"], out, str(tmp_path / "nope.png")))
    assert "nope.png does not exist" in line
    (tmp_path / "empty_dir").mkdir()
    line = one_line_error(invoke(tiny_bundle, inputs["labels"], out, str(tmp_path / "empty_dir")))
    assert "holds no images" in line
    assert not out.exists()
