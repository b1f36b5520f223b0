"""`segclip-data synth` and `segclip-data superpixels` through typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from segclip.cli.data import app

runner = CliRunner()
SMALL = ["--num", "5", "--val-num", "3", "--eval-num", "2", "--seed", "9", "--quiet"]


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_synth_writes_the_world_deterministically(tmp_path: Path) -> None:
    first = runner.invoke(app, ["synth", str(tmp_path / "a"), *SMALL])
    second = runner.invoke(app, ["synth", str(tmp_path / "b"), *SMALL])
    assert first.exit_code == 0 and second.exit_code == 0, first.output
    assert "wrote 5 training pairs, 3 val and 2 eval images" in first.stdout
    written = files(tmp_path / "a")
    assert written == files(tmp_path / "b")
    assert len((tmp_path / "a/train/pairs.jsonl").read_text().splitlines()) == 5
    assert (tmp_path / "a/val/ImageSets/Segmentation/val.txt").read_text().split() == [
        "000001", "000002", "000003"]
    assert "eval/SegmentationClass/000002.png" in written


def test_synth_size_option(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", str(tmp_path / "w"), "--num", "1", "--val-num", "0",
                                 "--size", "96", "--quiet"])
    assert result.exit_code == 0
    from PIL import Image

    assert Image.open(tmp_path / "w/train/images/000001.png").size == (96, 96)


def test_synth_user_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    bad = runner.invoke(app, ["synth", str(tmp_path / "x"), "--size", "8", "--quiet"])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "error: size must be in 32..1024 pixels, got 8"
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full/keep.txt").write_text("keep")
    taken = runner.invoke(app, ["synth", str(tmp_path / "full"), *SMALL])
    assert taken.exit_code == 2 and len(taken.stderr.strip().splitlines()) == 1
    assert "already exists" in taken.stderr and "Traceback" not in taken.output
    assert files(tmp_path / "full") == {"keep.txt": b"keep"}


def test_superpixels_cache_and_resume(tmp_path: Path) -> None:
    assert runner.invoke(app, ["synth", str(tmp_path / "w"), *SMALL]).exit_code == 0
    first = runner.invoke(app, ["superpixels", str(tmp_path / "w"), "--quiet"])
    assert first.exit_code == 0, first.output
    assert "5 computed, 0 already present" in first.stdout
    assert len(list((tmp_path / "w/train/superpixels/images").glob("*.npz"))) == 5
    again = runner.invoke(app, ["superpixels", str(tmp_path / "w/train/pairs.jsonl"), "--quiet"])
    assert again.exit_code == 0 and "0 computed, 5 already present" in again.stdout


def test_superpixels_user_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["superpixels", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert missing.stderr.strip() == f"error: data path {tmp_path / 'nope'} does not exist"
    (tmp_path / "pairs.jsonl").write_text('{"image": "gone.png", "caption": "a red star"}\n')
    gone = runner.invoke(app, ["superpixels", str(tmp_path)])
    assert gone.exit_code == 2 and len(gone.stderr.strip().splitlines()) == 1
    assert "gone.png not found" in gone.stderr
