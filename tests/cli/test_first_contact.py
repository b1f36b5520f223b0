"""What a new user meets first: one `--device` vocabulary with absent devices refused, help that
shows every default, one line per warning, and `segclip-run`'s flags and results
(docs/architecture.md "Command contracts")."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.core import TyperGroup, TyperOption
from typer.testing import CliRunner

from segclip.cli._exit import missing_extra_message
from segclip.runtime.devices import parse_device
from segclip.runtime.errors import EngineError
from segclip.runtime.variants import VARIANTS

runner = CliRunner()
NO_GPU = not __import__("torch").cuda.is_available()


def _commands() -> list[tuple[str, typer.Typer, list[str]]]:
    """Every console script of pyproject.toml and each of its subcommands."""
    import importlib

    import tomllib

    root = Path(__file__).resolve().parents[2]
    scripts = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))[
        "project"]["scripts"]
    found = []
    for name, target in sorted(scripts.items()):
        module, attr = target.split(":")
        app = getattr(importlib.import_module(module), attr)
        command = typer.main.get_command(app)
        subs = sorted(command.commands) if isinstance(command, TyperGroup) else [None]
        found += [(f"{name} {sub}" if sub else name, app, [sub] if sub else []) for sub in subs]
    return found


def test_every_command_is_in_the_help_check() -> None:
    names = {name for name, _, _ in _commands()}
    assert {"segclip-run", "segclip-serve", "segclip-train", "segclip-eval",
            "segclip-export onnx", "segclip-export dense", "segclip-export openvino",
            "segclip-data synth", "segclip-convert official"} <= names, names


@pytest.mark.parametrize("name,app,sub", _commands(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_help_shows_defaults(name: str, app: typer.Typer, sub: list[str]) -> None:
    result = runner.invoke(app, [*sub, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "<bool>" not in text  # flags take no value
    assert not re.search(r"\w \.(\s|$)", text), text  # no text eaten before a full stop
    usage = text[text.index("Usage:"):].splitlines()[0]
    assert "{" not in usage and "......" not in usage, usage  # required arguments read plainly
    command = typer.main.get_command(app)
    if sub:
        command = command.commands[sub[0]]
    ctx = command.make_context(name, [], resilient_parsing=True)
    for param in command.params:
        if "--out" in param.opts:
            assert "-o" in param.opts, (name, param.opts)
        if "--progress" in param.opts:
            assert "--quiet" in param.secondary_opts, (name, param.secondary_opts)
        if "--device" in param.opts:
            assert "auto|cpu|cuda|cuda:N" in (param.help or ""), (name, param.help)
        if "--variant" in param.opts:  # the one list of variants, wherever a command takes one
            assert "|".join(VARIANTS) in (param.help or ""), (name, param.help)
        shown = param.default not in (None, False, ()) and not param.required
        if isinstance(param, TyperOption) and shown and param.name != "help":
            record = param.get_help_record(ctx)
            assert record is not None and "[default:" in record[1], (name, param.name, record)


@pytest.mark.parametrize("name,app,sub", _commands(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_usage_errors_are_one_line(name: str, app: typer.Typer, sub: list[str]) -> None:
    result = runner.invoke(app, [*sub, "--no-such-flag"], prog_name=name.split()[0])
    line = one_line(result)
    assert line.startswith("error: no such option: --no-such-flag"), line
    assert line.endswith(f"(see '{name} --help')") and "Usage:" not in result.output, line


@pytest.mark.parametrize("args,start", [
    (["--label", "cat", "a.png"], "error: missing option '--engine'"),
    (["--engine", "b"], "error: missing argument 'IMAGE|DIR...'"),
    (["--engine", "b", "--threads", "two", "a.png"], "error: invalid value for '--threads'"),
    (["--engine", "b", "--top-k", "0", "a.png"], "error: invalid value for '--top-k'"),
    (["--engine", "b", "--batch-size", "0", "a.png"], "error: invalid value for '--batch-size'"),
])
def test_run_usage_errors_are_one_line(args: list[str], start: str) -> None:
    from segclip.runtime.cli import app

    line = one_line(runner.invoke(app, args, prog_name="segclip-run"))
    assert line.startswith(start) and line.endswith("(see 'segclip-run --help')"), line


@pytest.mark.parametrize("args,start", [
    (["--threads", "0"], "error: invalid value for '--threads'"),
    (["--port", "70000"], "error: invalid value for '--port'"),
])
def test_serve_option_bounds_are_one_line(args: list[str], start: str, tmp_path: Path) -> None:
    from segclip.runtime.serve.cli import app

    # the bundle is missing too: a bound not checked still ends in an error, never a server
    result = runner.invoke(app, ["--engine", str(tmp_path / "missing"), *args],
                           prog_name="segclip-serve")
    line = one_line(result)
    assert line.startswith(start) and line.endswith("(see 'segclip-serve --help')"), line


def test_group_usage_errors_are_one_line_and_a_bare_group_shows_help() -> None:
    from segclip.export.cli import app

    line = one_line(runner.invoke(app, ["onx"]))
    assert line.startswith("error: no such command 'onx'") and "'onnx'" in line, line
    bare = runner.invoke(app, [])
    assert "Commands:" in bare.output and "onnx" in bare.output and "error:" not in bare.output


def test_help_keeps_bracketed_defaults() -> None:
    from segclip.cli.evaluate import app

    text = runner.invoke(app, ["--help"], terminal_width=200).output
    assert "Background threshold [default: the preset's, else the checkpoint's, else 0.80]" in text
    assert "--progress / --quiet" in text


@pytest.mark.parametrize("spec,expected", [("auto", ("auto", None)), ("cpu", ("cpu", None)),
                                           ("cuda", ("cuda", None)), ("cuda:1", ("cuda", 1)),
                                           (" CUDA:0 ", ("cuda", 0))])
def test_device_vocabulary(spec: str, expected: tuple[str, int | None]) -> None:
    assert parse_device(spec) == expected


@pytest.mark.parametrize("spec", ["gpu", "tpu", "cpu:1", "cuda:-1", "cuda:", "mps", ""])
def test_unknown_devices_are_refused(spec: str) -> None:
    with pytest.raises(EngineError, match=r"unknown device .*; choose one of auto, cpu, cuda or "
                                          r"cuda:N"):
        parse_device(spec)


@pytest.mark.skipif(not NO_GPU, reason="checks the refusal of an absent GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_absent_gpu_is_an_error_in_torch(spec: str) -> None:
    from segclip.devices import torch_device
    from segclip.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"device '{spec}' is not available: this machine has "
                                          r"no CUDA GPU .*use --device cpu"):
        torch_device(spec)
    assert torch_device("auto").type == "cpu" and torch_device(None).type == "cpu"


def one_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.skipif(not NO_GPU, reason="checks the refusal of an absent GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "gpu"])
@pytest.mark.parametrize("model", ["checkpoint", "bundle"])
def test_eval_refuses_absent_or_unknown_device(spec: str, model: str, tiny_checkpoint: Path,
                                               tiny_bundle: Path, synth_world: Path,
                                               tmp_path: Path) -> None:
    from segclip.cli.evaluate import app

    data = synth_world / "eval"
    path = tiny_checkpoint if model == "checkpoint" else tiny_bundle
    result = runner.invoke(app, [str(path), "--data", str(data), "--classes",
                                 str(data / "classes.txt"), "--device", spec, "--quiet",
                                 "--out", str(tmp_path / "r.json")])
    line = one_line(result)
    assert spec in line and ("choose one of" in line or "not available" in line), line
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(not NO_GPU, reason="checks the refusal of an absent GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "tpu"])
def test_train_refuses_absent_or_unknown_device(spec: str, synth_world: Path,
                                                tmp_path: Path) -> None:
    from segclip.cli.train import app

    result = runner.invoke(app, ["--config", "tiny", "--data", str(synth_world / "train"),
                                 "--out", str(tmp_path / "run"), "--steps", "1", "--quiet",
                                 "--device", spec])
    line = one_line(result)
    assert repr(spec) in line
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_missing_extra_messages() -> None:
    message = missing_extra_message(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert message == ("error: this command needs the training extra (torch is not installed): "
                       "pip install 'segclip[train]'")
    assert "segclip[openvino]" in missing_extra_message(
        ModuleNotFoundError("x", name="openvino.runtime"))
    assert missing_extra_message(ModuleNotFoundError("x", name="numpy")) is None


# ---- segclip-run ------------------------------------------------------------------------------
def _image(path: Path, seed: int = 0, size: tuple[int, int] = (60, 90)) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((*size, 3), np.uint8)
    pixels[:] = rng.integers(0, 255, 3)
    pixels[10:40, 20:70] = rng.integers(0, 255, 3)
    Image.fromarray(pixels).save(path)
    return path


def _run(*args: str):
    from segclip.runtime.cli import app

    return runner.invoke(app, ["--quiet", *args])


@pytest.mark.parametrize("bad", ["not-an-image", "too-many-pixels", "one-by-4000"])
def test_a_lone_unreadable_image_prints_one_line_and_writes_nothing(tiny_bundle: Path,
                                                                   tmp_path: Path,
                                                                   bad: str) -> None:
    image = tmp_path / "bad.png"
    extra: list[str] = []
    if bad == "not-an-image":
        image.write_text("hello")
    elif bad == "too-many-pixels":
        _image(image)
        extra = ["--max-pixels", "100"]
    else:
        Image.new("RGB", (4000, 1)).save(image)
        extra = ["--max-pixels", "3999"]
    out = tmp_path / "out"
    result = _run("--engine", str(tiny_bundle), "--label", "cat", "-o", str(out), *extra,
                  str(image))
    line = one_line(result)
    assert "skipped" not in line and "continuing" not in line
    assert result.stdout == ""  # no summary table, no "results in"
    assert not out.exists()
    if bad == "too-many-pixels":
        assert "--max-pixels" in line


def test_a_lone_unreadable_image_shows_no_progress_bar(tiny_bundle: Path, tmp_path: Path) -> None:
    from segclip.runtime.cli import app

    image = tmp_path / "bad.png"
    image.write_text("hello")
    result = runner.invoke(app, ["--engine", str(tiny_bundle), "--label", "cat", "-o",
                                 str(tmp_path / "out"), str(image)])  # progress on (default)
    line = one_line(result)
    assert "\r" not in result.stderr and "segclip-run:" not in result.stderr, result.stderr
    assert line.startswith(f"error: cannot read {image} as an image"), line
    assert result.stdout == "" and not (tmp_path / "out").exists()


def test_labels_on_the_command_line_and_flags(tiny_bundle: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "scene.png")
    (tmp_path / "labels.txt").write_text("red square\n")
    out = tmp_path / "out"
    result = _run("--engine", str(tiny_bundle), "--labels", str(tmp_path / "labels.txt"),
                  "--label", "blue circle", "--label", "cat", "-o", str(out), "--variant",
                  "fp16", "--threads", "1", "--batch-size", "2", "--top-k", "2", "--cache-dir",
                  str(tmp_path / "cache"), "--confidence", "--threshold", "0", str(image))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "scene.json").read_text())
    assert report["labels"] == ["red square", "blue circle", "cat"]
    assert report["run"]["variant"] == "fp16" and report["backend_info"]["variant"] == "fp16"
    assert list(report["scores"]) == report["labels"]
    assert any((tmp_path / "cache").iterdir())
    with Image.open(out / "scene_conf.png") as conf:
        assert conf.mode == "L" and conf.size == (90, 60)
        levels = np.asarray(conf)
    assert levels.max() > 0
    assert "wall" in result.stdout and "write" in result.stdout


def test_no_labels_is_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    line = one_line(_run("--engine", str(tiny_bundle), "-o", str(tmp_path / "o"),
                         str(_image(tmp_path / "a.png"))))
    assert "--labels FILE" in line and "--label NAME" in line


def test_skip_existing_redoes_results_of_other_settings(tiny_bundle: Path,
                                                        tmp_path: Path) -> None:
    image = _image(tmp_path / "scene.png")
    out = tmp_path / "out"
    base = ["--engine", str(tiny_bundle), "-o", str(out), "--skip-existing"]
    assert _run(*base, "--label", "cat", str(image)).exit_code == 0
    first = json.loads((out / "scene.json").read_text())
    same = _run(*base, "--label", "cat", str(image))
    assert "1       0     1" in same.stdout.replace("  ", "  ")  # 1 image, 0 done, 1 skipped
    for changed in (["--label", "dog"], ["--label", "cat", "--threshold", "0.1"],
                    ["--label", "cat", "--variant", "fp16"]):
        result = _run(*base, *changed, str(image))
        assert result.exit_code == 0, result.output
        redone = json.loads((out / "scene.json").read_text())
        assert redone["run"] != first["run"], changed
        first = redone
    other = tmp_path / "other-bundle"
    shutil.copytree(tiny_bundle, other)
    manifest = json.loads((other / "segclip.json").read_text())
    manifest["note"] = "another export"
    (other / "segclip.json").write_text(json.dumps(manifest))
    result = _run("--engine", str(other), "-o", str(out), "--skip-existing", "--label", "cat",
                  "--variant", "fp16", str(image))
    assert result.exit_code == 0, result.output
    redone = json.loads((out / "scene.json").read_text())["run"]
    assert redone["bundle"] == str(other.resolve()) and redone != first["run"]
    assert redone["manifest_sha256"] != first["run"]["manifest_sha256"]


def test_skip_existing_adds_a_missing_confidence_map(tiny_bundle: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "scene.png")
    base = ["--engine", str(tiny_bundle), "-o", str(tmp_path / "out"), "--label", "cat"]
    assert _run(*base, str(image)).exit_code == 0
    assert not (tmp_path / "out" / "scene_conf.png").exists()
    again = _run(*base, "--skip-existing", "--confidence", str(image))
    assert again.exit_code == 0 and (tmp_path / "out" / "scene_conf.png").is_file()
    assert "1       1     0" in again.stdout, again.stdout  # 1 image, 1 done, 0 skipped
    third = _run(*base, "--skip-existing", "--confidence", str(image))
    assert "1       0     1" in third.stdout, third.stdout  # now complete: skipped


def test_missing_variant_file_names_the_fix(tiny_bundle: Path, tmp_path: Path) -> None:
    line = one_line(_run("--engine", str(tiny_bundle / "image.int8.onnx"), "--label", "cat",
                         "-o", str(tmp_path / "o"), str(_image(tmp_path / "a.png"))))
    assert "has no int8 graph" in line and "--int8" in line
    assert not (tmp_path / "o").exists() and not (tiny_bundle / "image.int8.onnx").exists()


def test_long_labels_warn_once_on_one_line_each(tiny_bundle: Path, tmp_path: Path) -> None:
    long_a, long_b = "very long label " * 40, "another long label " * 40
    result = subprocess.run(
        [sys.executable, "-m", "segclip.runtime.cli", "--engine", str(tiny_bundle), "--label",
         long_a, "--label", long_b, "-o", str(tmp_path / "o"), "--quiet",
         str(_image(tmp_path / "a.png")), str(_image(tmp_path / "b.png", 1))],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: label ") for line in lines), lines
    assert "segmenter.py" not in result.stderr and "Warning:" not in result.stderr


def test_eval_takes_labels_on_the_command_line(tiny_bundle: Path, synth_world: Path,
                                               tmp_path: Path) -> None:
    from segclip.cli.evaluate import app

    data = synth_world / "eval"
    names = (data / "classes.txt").read_text().split("\n")
    names = [n for n in names if n.strip()]
    by_file = runner.invoke(app, [str(tiny_bundle), "--data", str(data), "--classes",
                                  str(data / "classes.txt"), "--quiet", "-o",
                                  str(tmp_path / "a.json")])
    by_flag = runner.invoke(app, [str(tiny_bundle), "--data", str(data), "--quiet", "-o",
                                  str(tmp_path / "b.json"),
                                  *[arg for name in names for arg in ("--label", name)]])
    assert by_file.exit_code == 0 and by_flag.exit_code == 0, by_flag.output
    first, second = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert first["miou"] == second["miou"] and first["per_class"] == second["per_class"]
    both = runner.invoke(app, [str(tiny_bundle), "--data", str(data), "--classes", "voc",
                               "--label", "cat"])
    assert "either --classes or --label" in one_line(both)


def test_export_of_a_bundle_folder_says_what_it_takes(tiny_bundle: Path, tmp_path: Path) -> None:
    from segclip.export.cli import app

    result = runner.invoke(app, ["onnx", str(tiny_bundle), "-o", str(tmp_path / "b"), "--quiet"])
    line = one_line(result)
    assert f"{tiny_bundle} is a bundle folder" in line and "checkpoint (ckpt.pt)" in line, line
    assert "not found" not in line and not (tmp_path / "b").exists()


@pytest.mark.parametrize("content,kind", [(b"hello\n", "a text file"),
                                          (b"cat says hi\n", "a text file")])
def test_eval_of_a_text_file_names_its_kind(content: bytes, kind: str, synth_world: Path,
                                            tmp_path: Path) -> None:
    from segclip.cli.evaluate import app

    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(content)
    data = synth_world / "eval"
    line = one_line(runner.invoke(app, [str(bad), "--data", str(data), "--classes",
                                        str(data / "classes.txt"), "--quiet"]))
    assert line == f"error: not a checkpoint: {bad} is {kind}, not a torch.save file", line
    assert "pickle" not in line and "(101)" not in line


def test_summary_time_is_wall_time_with_its_stages(tiny_bundle: Path, tmp_path: Path) -> None:
    import time

    images = [_image(tmp_path / f"im{i}.png", i, (300, 400)) for i in range(3)]
    start = time.perf_counter()
    result = _run("--engine", str(tiny_bundle), "--label", "cat", "-o", str(tmp_path / "o"),
                  "--confidence", *map(str, images))
    elapsed_ms = (time.perf_counter() - start) * 1000
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("mean ms per image"))
    wall = float(re.search(r"wall ([\d.]+) =", line).group(1))
    stages = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)", line.split("=", 1)[1])}
    assert "write" in stages and stages["write"] > 0, line
    assert wall >= sum(stages.values()) - 0.5, line  # the stages are parts of the wall time
    assert 3 * wall <= elapsed_ms, (line, elapsed_ms)
    per_image = [json.loads((tmp_path / "o" / f"im{i}.json").read_text())["timings_ms"]
                 for i in range(3)]  # the segmentation alone: less than the wall time
    assert sum(t["load"] + t["total"] for t in per_image) / 3 <= wall, (per_image, line)
