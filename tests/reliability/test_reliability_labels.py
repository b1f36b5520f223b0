"""Bad input, labels: bad labels files are one-line errors (exit 2, nothing written) in segclip-run
and bad class lists in segclip-eval; 10,000 labels work with bounded memory; a label longer than
the text context is truncated with a warning. (tests/cli/test_cli_run.py covers a missing file
and a file of comments only; tests/runtime/test_labels.py the parser itself.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _reliability_support import assert_user_error, entries, invoke, write_image
from PIL import Image

BAD_LABELS = {
    "zero_bytes": (b"", "holds no labels"),
    "blank_lines": (b"\n   \n\t\n", "holds no labels"),
    "comments_with_bom": ("\ufeff# animals\n# none yet\n".encode(), "holds no labels"),
    "duplicate": (b"cat\ndog\ncat\n", "line 3: duplicate label 'cat'"),
    "duplicate_case_space": (b"Big  Cat\nbig cat\n", "duplicate label 'big cat'"),
    "latin1_byte": (b"cat\ncaf\xe9\n", "line 2 is not valid UTF-8"),
    "utf16": ("cat\ndog\n".encode("utf-16"), "is not valid UTF-8"),
    "binary_png": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not valid UTF-8"),
    "background": (b"cat\nBackground\n", "'background' is reserved"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LABELS))
def test_run_refuses_a_bad_labels_file(kind: str, tmp_path: Path, rel_bundle: Path) -> None:
    from segclip.runtime.cli import app

    content, fragment = BAD_LABELS[kind]
    labels = tmp_path / "labels.txt"
    labels.write_bytes(content)
    image = write_image("rgb", tmp_path / "photo.png")
    out = tmp_path / "out"
    result = invoke(app, ["--engine", rel_bundle, "--labels", labels, "--out", out, "--quiet",
                          image])
    assert_user_error(result, fragment)
    assert entries(out) == []


def test_run_refuses_a_directory_as_labels(tmp_path: Path, rel_bundle: Path) -> None:
    from segclip.runtime.cli import app

    image = write_image("rgb", tmp_path / "photo.png")
    result = invoke(app, ["--engine", rel_bundle, "--labels", tmp_path, "--out", tmp_path / "o",
                          "--quiet", image])
    assert_user_error(result, "is a directory")
    assert not (tmp_path / "o").exists()


BAD_CLASSES = {
    "zero_bytes": (b"", "is empty"),
    "duplicate": (b"cat\ndog\ncat\n", "repeats ['cat']"),
    "latin1_byte": (b"cat\ncaf\xe9\n", "is not UTF-8"),
    "background_first": (b"background\ncat\n", "starts with 'background'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CLASSES))
def test_eval_refuses_a_bad_class_list(kind: str, tmp_path: Path, tiny_checkpoint: Path,
                                       synth_world: Path) -> None:
    from segclip.cli.evaluate import app

    content, fragment = BAD_CLASSES[kind]
    classes = tmp_path / "classes.txt"
    classes.write_bytes(content)
    out = tmp_path / "res" / "eval.json"
    result = invoke(app, [tiny_checkpoint, "--data", synth_world / "val", "--classes", classes,
                          "--out", out, "--quiet"])
    assert_user_error(result, fragment, str(classes))
    assert not out.parent.exists()


def test_long_label_is_truncated_with_a_warning_through_the_cli(tmp_path: Path,
                                                                 rel_bundle: Path) -> None:
    from segclip.runtime.cli import app

    long_label = " ".join(f"word{i}" for i in range(120))  # far past 77 tokens
    labels = tmp_path / "labels.txt"
    labels.write_text(f"cat\n{long_label}\n")
    image = write_image("rgb", tmp_path / "photo.png")
    out = tmp_path / "out"
    result = invoke(app, ["--engine", rel_bundle, "--labels", labels, "--out", out, "--quiet",
                          image])
    assert result.exit_code == 0, result.output
    assert any("LabelTruncatedWarning" in w and "word0 word1" in w and "77" in w
               for w in result.user_warnings), result.user_warnings
    report = json.loads((out / "photo.json").read_text())
    assert report["labels"] == ["cat", long_label]


_MANY_LABELS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time, warnings
    import numpy as np
    from segclip.runtime.cli import app

    bundle, labels, image, out = sys.argv[1:5]
    warnings.simplefilter("error")  # no warning expected for short labels
    from segclip.runtime import Segmenter
    Segmenter(bundle, device="cpu").close()  # sessions loaded once: the memory baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        app([ "--engine", bundle, "--labels", labels, "--out", out, "--device", "cpu",
              "--quiet", image], standalone_mode=False)
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                      "growth_mb": (peak - base) / 1024}))
""")


def test_ten_thousand_labels_work_with_bounded_memory(tmp_path: Path, rel_bundle: Path) -> None:
    """10,000 labels through segclip-run: label map values index them, and the text tower runs
    in batches (the tiny tower on all 10,000 prompts at once peaks at several GB)."""
    labels = tmp_path / "labels.txt"
    names = [f"object number {i}" for i in range(10_000)]
    labels.write_text("\n".join(names) + "\n")
    image = write_image("rgb", tmp_path / "photo.png", size=(96, 64))
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", _MANY_LABELS_SCRIPT, str(rel_bundle),
                            str(labels), str(image), str(out)], capture_output=True, text=True,
                           timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr[-2000:]
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    assert figures["code"] == 0, child.stderr[-2000:]
    report = json.loads((out / "photo.json").read_text())
    assert len(report["labels"]) == 10_000 and report["values"]["object number 9999"] == 10_000
    assert sum(report["counts"].values()) == 96 * 64
    with Image.open(out / "photo.png") as label_map:
        values = np.asarray(label_map)
        assert values.shape == (64, 96) and int(values.max()) <= 10_000
    assert figures["growth_mb"] < 1024, (
        f"10,000 labels grew the peak resident memory by {figures['growth_mb']:.0f} MB in "
        f"{figures['seconds']:.1f} s: the text tower is not run in batches")
