"""Resource limits: images above the pixel limit (default 100 megapixels, `--max-pixels` /
`max_pixels`) are refused from their header, before any pixel is decoded, in time and memory that
stay tiny (decompression bombs: ~100-byte PNGs claiming huge sizes); output names never leave
`--out`; an unusable `--out` is a one-line error in every command.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _reliability_support import assert_user_error, entries, invoke, png_bomb, write_image

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def bmp_bomb(path: Path, width: int, height: int) -> Path:
    """A 54-byte BMP header claiming width x height 24-bit pixels, with no pixel data."""
    header = struct.pack("<2sIHHI", b"BM", 54, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    path.write_bytes(header + info)
    return path


_BOMB_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    from segclip.runtime import Segmenter
    from segclip.runtime.errors import ImageError

    segmenter = Segmenter(sys.argv[1], device="cpu")
    segmenter.segment(sys.argv[2], ["cat", "dog"])  # warm: sessions, embeddings, buffers
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {}
    for path in sys.argv[3:]:
        start = time.perf_counter()
        try:
            segmenter.segment(path, ["cat", "dog"])
            report[path] = ["accepted", time.perf_counter() - start]
        except ImageError as e:
            report[path] = [str(e), time.perf_counter() - start]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mb": (peak - base) / 1024, "calls": report}))
""")


def test_bombs_are_refused_from_the_header_in_tiny_time_and_memory(tmp_path: Path,
                                                                   rel_bundle: Path) -> None:
    warm = write_image("rgb", tmp_path / "warm.png")
    bombs = {
        png_bomb(tmp_path / "over_limit.png", 12_000, 10_000): "over the limit of 100,000,000",
        png_bomb(tmp_path / "pillow_bomb.png", 30_000, 30_000): "decompression-bomb",
        png_bomb(tmp_path / "giant.png", 2_000_000, 2_000_000): "decompression-bomb",
        bmp_bomb(tmp_path / "over_limit.bmp", 11_000, 10_000): "over the limit of 100,000,000",
    }
    assert all(path.stat().st_size < 2_000 for path in bombs)
    child = subprocess.run([sys.executable, "-c", _BOMB_SCRIPT, str(rel_bundle), str(warm),
                            *map(str, bombs)], capture_output=True, text=True, timeout=300,
                           env=ENV)
    assert child.returncode == 0, child.stderr[-2000:]
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    for path, fragment in bombs.items():
        message, seconds = figures["calls"][str(path)]
        assert fragment in message, (path.name, message)
        assert seconds < 0.5, f"{path.name} took {seconds:.2f} s to refuse"
    # decoding the smallest of them would take 360 MB
    assert figures["growth_mb"] < 30, f"peak memory grew by {figures['growth_mb']:.0f} MB"


def test_run_reports_a_bomb_and_finishes_the_other_images(tmp_path: Path,
                                                          rel_bundle: Path) -> None:
    from segclip.runtime.cli import app

    (tmp_path / "in").mkdir()
    good = write_image("rgb", tmp_path / "in" / "good.png")
    bomb = png_bomb(tmp_path / "in" / "bomb.png", 12_000, 10_000)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    out = tmp_path / "out"
    result = invoke(app, ["--engine", rel_bundle, "--labels", labels, "--out", out, "--quiet",
                          good, bomb])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert any(str(bomb) in line and "over the limit of 100,000,000" in line
               for line in result.stderr.splitlines()), result.stderr
    assert entries(out) == ["good.json", "good.png", "good_overlay.jpg"]


def test_max_pixels_is_configurable_at_the_exact_boundary(tmp_path: Path,
                                                         rel_bundle: Path) -> None:
    from segclip.runtime.cli import app

    image = write_image("rgb", tmp_path / "photo.png", size=(48, 40))  # 1,920 pixels
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n")
    refused = invoke(app, ["--engine", rel_bundle, "--labels", labels, "--out", tmp_path / "a",
                           "--max-pixels", "1919", "--quiet", image])
    assert refused.exit_code == 2 and "over the limit of 1,919" in refused.stderr
    assert entries(tmp_path / "a") == []
    accepted = invoke(app, ["--engine", rel_bundle, "--labels", labels, "--out", tmp_path / "b",
                            "--max-pixels", "1920", "--quiet", image])
    assert accepted.exit_code == 0, accepted.output
    assert entries(tmp_path / "b") == ["photo.json", "photo.png", "photo_overlay.jpg"]


@pytest.mark.parametrize("claimed", [(12_000, 10_000), (30_000, 30_000)])
@pytest.mark.parametrize("model", ["checkpoint", "bundle"])
def test_eval_refuses_a_bomb_in_the_data_set(model: str, claimed: tuple[int, int],
                                             tmp_path: Path, tiny_checkpoint: Path,
                                             rel_bundle: Path, synth_world: Path) -> None:
    import shutil

    from segclip.cli.evaluate import app

    root = Path(shutil.copytree(synth_world / "val", tmp_path / "voc"))
    first = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    for old in (root / "JPEGImages").glob(f"{first}.*"):
        old.unlink()
    bomb = png_bomb(root / "JPEGImages" / f"{first}.png", *claimed)
    out = tmp_path / "res" / "eval.json"
    result = invoke(app, [tiny_checkpoint if model == "checkpoint" else rel_bundle, "--data", root,
                          "--classes", synth_world / "classes.txt", "--out", out, "--quiet"])
    assert_user_error(result, str(bomb))
    assert not out.parent.exists()


@pytest.mark.parametrize("claimed", [(12_000, 10_000), (30_000, 30_000)])
def test_train_refuses_a_bomb_in_the_pairs(claimed: tuple[int, int], tmp_path: Path) -> None:
    from segclip.cli.train import app

    rows = []
    for index in range(4):
        path = tmp_path / f"img{index}.png"
        if index == 0:
            png_bomb(path, *claimed)
        else:
            write_image("rgb", path)
        rows.append(json.dumps({"image": path.name, "caption": f"shape {index}"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    result = invoke(app, ["--config", "tiny", "--recipe", "synth", "--data",
                          tmp_path / "pairs.jsonl", "--out", tmp_path / "run", "--steps", "1",
                          "--batch-size", "4", "--set", "superpixel_kl_weight=0", "--quiet"])
    assert_user_error(result, str(tmp_path / "img0.png"))
    assert entries(tmp_path / "run") == []


# ---- output paths -------------------------------------------------------------------------------
def test_run_output_names_stay_inside_out(tmp_path: Path, rel_bundle: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Hostile and awkward input names: every result lands directly in --out under a safe,
    visible, short-enough name, and nothing is written anywhere else."""
    from segclip.runtime.cli import app

    folder = tmp_path / "in"
    folder.mkdir()
    names = ["with space.png", "new\nline.png", "semi;colon$(x).png", "x" * 250 + ".png",
             "猫" * 83 + ".png"]  # 249 UTF-8 bytes: fits as input, too long with "_overlay.jpg"
    for name in names:
        write_image("rgb", folder / name)
    work = tmp_path / "work"
    work.mkdir()
    write_image("rgb", tmp_path / "up.png")
    monkeypatch.chdir(work)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n")
    before = {p for p in tmp_path.rglob("*")}
    result = invoke(app, ["--engine", rel_bundle, "--labels", labels, "--out", "out", "--quiet",
                          folder, "../up.png"])
    assert result.exit_code == 0, result.output
    out = work / "out"
    created = {p for p in tmp_path.rglob("*")} - before
    assert created == {out, *out.iterdir()}, sorted(map(str, created - {out}))
    produced = entries(out)
    assert len(produced) == 3 * (len(names) + 1), produced
    for name in produced:
        assert not name.startswith(".") and "/" not in name and "\n" not in name
        assert len(name.encode()) <= 255
    assert "up.json" in produced


@pytest.mark.parametrize("where", ["existing_directory", "under_a_file"])
@pytest.mark.parametrize("command", ["eval", "convert", "export", "train", "run"])
def test_unusable_out_is_a_one_line_error(command: str, where: str, tmp_path: Path,
                                          tiny_checkpoint: Path, rel_bundle: Path,
                                          synth_world: Path) -> None:
    blocker = tmp_path / "taken"
    if where == "existing_directory":
        blocker.mkdir()
        (blocker / "keep.txt").write_text("keep")
        out = blocker
    else:
        blocker.write_text("keep")
        out = blocker / "result"
    if command in ("export", "train", "run") and where == "existing_directory":
        out = tmp_path / "plain_file"  # these take a directory: give them a file instead
        out.write_text("keep")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    if command == "eval":
        from segclip.cli.evaluate import app

        args = [tiny_checkpoint, "--data", synth_world / "val", "--classes",
                synth_world / "classes.txt", "--out", out, "--quiet"]
    elif command == "convert":
        from segclip.cli.convert import app

        args = ["to-official", tiny_checkpoint, "--out", out]
    elif command == "export":
        from segclip.export.cli import app

        args = ["onnx", tiny_checkpoint, "--out", out]
    elif command == "train":
        from segclip.cli.train import app

        args = ["--config", "tiny", "--recipe", "synth", "--data", synth_world, "--out", out,
                "--steps", "1", "--batch-size", "4", "--quiet"]
    else:
        from segclip.runtime.cli import app

        labels = tmp_path / "labels.txt"
        labels.write_text("cat\n")
        image = write_image("rgb", tmp_path / "photo.png")
        before.update({labels: labels.read_bytes(), image: image.read_bytes()})
        args = ["--engine", rel_bundle, "--labels", labels, "--out", out, "--quiet", image]
    assert_user_error(invoke(app, args), str(out.name))
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing left behind
