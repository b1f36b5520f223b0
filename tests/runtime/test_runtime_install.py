"""The runtime installs and runs alone (docs/architecture.md "Layout and packages": a plain `pip
install .`
is the runtime, without torch). Builds a fresh virtual environment, installs this checkout
without extras (pip fetches the core dependencies from the package index), and segments an image
with the tiny bundle there, through the Python API and through `segclip-run`. Slow (about a
minute, mostly downloads), but part of the default test run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def run(args: list[str], timeout: int = 900, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def copy_checkout(target: Path) -> Path:
    """The files git would ship (tracked + untracked-not-ignored), without .venv or builds."""
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                 cwd=REPO).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def fresh_env(tmp_path_factory: pytest.TempPathFactory, name: str, extras: str = "") -> Path:
    """A new virtual environment with this checkout installed (`pip install '.[extras]'`)."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the checkout's files")
    root = tmp_path_factory.mktemp(name)
    source = copy_checkout(root / "src")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", f"{source}{extras}"])
    return env_dir


@pytest.fixture(scope="module")
def runtime_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_env(tmp_path_factory, "install")


def test_runtime_alone_segments_without_torch(runtime_env: Path, tiny_bundle: Path,
                                              tmp_path: Path) -> None:
    python = runtime_env / "bin" / "python"
    image = np.zeros((80, 120, 3), np.uint8)
    image[20:60, 30:90] = (200, 30, 30)
    Image.fromarray(image).save(tmp_path / "image.png")
    code = (
        "import importlib.util, json, sys\n"
        "assert importlib.util.find_spec('torch') is None, 'torch is installed'\n"
        "from segclip.runtime import Segmenter\n"
        f"seg = Segmenter({str(tiny_bundle)!r}, device='auto')\n"
        f"result = seg.segment({str(tmp_path / 'image.png')!r}, ['red square', 'cat'])\n"
        "assert 'torch' not in sys.modules\n"
        "print(json.dumps({'shape': list(result.label_map.shape),\n"
        "                  'max': int(result.label_map.max()),\n"
        "                  'sum': sum(result.fractions.values()), 'backend': result.backend}))\n")
    result = run([str(python), "-c", code], timeout=300, cwd=tmp_path)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shape"] == [80, 120] and report["max"] <= 2
    assert abs(report["sum"] - 1.0) < 1e-9
    assert report["backend"] == "onnxruntime/CPUExecutionProvider"
    (tmp_path / "labels.txt").write_text("red square\ncat\n")
    cli = runtime_env / "bin" / "segclip-run"
    run([str(cli), "--engine", str(tiny_bundle), "--labels", str(tmp_path / "labels.txt"),
         "--out", str(tmp_path / "out"), "--quiet", str(tmp_path / "image.png")],
        timeout=300, cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "image.json", "image.png", "image_overlay.jpg"]
    assert sys.executable != str(python)


# Each command in the runtime-only install: works, or one line naming the extra, exit 2.
NEEDS_TRAIN = [
    ["segclip-export", "onnx", "{ckpt}"],
    ["segclip-export", "dense", "{ckpt}", "-o", "{tmp}/dense"],
    ["segclip-train", "--config", "tiny", "--data", "{tmp}", "--out", "{tmp}/run"],
    ["segclip-convert", "clip", "{ckpt}", "--out", "{tmp}/c.pt"],
    ["segclip-eval", "{ckpt}", "--data", "{data}", "--classes", "{data}/classes.txt"],
    ["segclip-data", "superpixels", "{tmp}"],
]


@pytest.mark.parametrize("command", NEEDS_TRAIN, ids=lambda c: "-".join(c[:2]))
def test_torch_commands_name_the_training_extra(runtime_env: Path, tiny_checkpoint: Path,
                                                synth_world: Path, tmp_path: Path,
                                                command: list[str]) -> None:
    args = [part.format(ckpt=tiny_checkpoint, tmp=tmp_path, data=synth_world / "eval")
            for part in command]
    result = subprocess.run([str(runtime_env / "bin" / args[0]), *args[1:]],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]] and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: this command needs the training extra"), lines[0]
    assert lines[0].endswith("pip install 'segclip[train]'")
    assert not (tmp_path / "run").exists() and not (tmp_path / "c.pt").exists()


# Export subcommands that need another extra as well: one line naming the extra to install.
NEEDS_AN_EXTRA = [
    ["segclip-export", "verify", "{bundle}", "{ckpt}"],
    ["segclip-export", "openvino", "{bundle}", "{ckpt}"],
    ["segclip-export", "trt", "{bundle}"],
    ["segclip-convert", "official", "{ckpt}", "-o", "{tmp}/o.pt"],
    ["segclip-convert", "to-official", "{ckpt}", "-o", "{tmp}/o.bin"],
    ["segclip-serve", "--engine", "{bundle}", "--port", "0"],
]


@pytest.mark.parametrize("command", NEEDS_AN_EXTRA, ids=lambda c: "-".join(c[:2]))
def test_other_commands_name_their_extra(runtime_env: Path, tiny_checkpoint: Path,
                                         tiny_bundle: Path, tmp_path: Path,
                                         command: list[str]) -> None:
    args = [part.format(ckpt=tiny_checkpoint, bundle=tiny_bundle, tmp=tmp_path)
            for part in command]
    before = sorted(p.name for p in tiny_bundle.iterdir())
    result = subprocess.run([str(runtime_env / "bin" / args[0]), *args[1:]],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ") and "pip install 'segclip[" in lines[0], lines[0]
    assert sorted(p.name for p in tiny_bundle.iterdir()) == before
    assert list(tmp_path.iterdir()) == []


# segclip-run options that need an extra: one line naming it, nothing written.
RUN_NEEDS_AN_EXTRA = {"ray": ["--ray"], "openvino": ["--variant", "ov-f32"]}


@pytest.mark.parametrize("extra", sorted(RUN_NEEDS_AN_EXTRA))
def test_run_options_name_their_extra(runtime_env: Path, tiny_bundle: Path, tmp_path: Path,
                                      extra: str) -> None:
    Image.new("RGB", (32, 24), (200, 30, 30)).save(tmp_path / "image.png")
    result = subprocess.run(
        [str(runtime_env / "bin" / "segclip-run"), "--engine", str(tiny_bundle), "--label",
         "cat", "-o", str(tmp_path / "out"), *RUN_NEEDS_AN_EXTRA[extra],
         str(tmp_path / "image.png")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ") and f"pip install 'segclip[{extra}]'" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_eval_of_a_bundle_works_without_torch(runtime_env: Path, tiny_bundle: Path,
                                              synth_world: Path, tmp_path: Path) -> None:
    data = synth_world / "eval"
    result = run([str(runtime_env / "bin" / "segclip-eval"), str(tiny_bundle), "--data",
                  str(data), "--classes", str(data / "classes.txt"), "--quiet",
                  "--out", str(tmp_path / "eval.json")], timeout=300, cwd=tmp_path)
    assert "mIoU" in result.stdout or "miou" in result.stdout.lower()
    assert 0.0 <= json.loads((tmp_path / "eval.json").read_text())["miou"] <= 1.0


def test_synthetic_world_needs_no_torch(runtime_env: Path, tmp_path: Path) -> None:
    run([str(runtime_env / "bin" / "segclip-data"), "synth", str(tmp_path / "world"), "--num",
         "4", "--size", "64"], timeout=300, cwd=tmp_path)
    assert (tmp_path / "world" / "train" / "pairs.jsonl").is_file()


def _scripts() -> list[str]:
    import tomllib

    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    return sorted(tomllib.loads(text)["project"]["scripts"])


@pytest.mark.parametrize("command", _scripts())
def test_every_command_shows_help(runtime_env: Path, command: str) -> None:
    result = run([str(runtime_env / "bin" / command), "--help"], timeout=120)
    assert result.stdout.startswith(f"Usage: {command} ") and "Traceback" not in result.stderr
    if command in ("segclip-run", "segclip-serve", "segclip-eval", "segclip-train"):
        assert "[default:" in result.stdout


@pytest.fixture(scope="module")
def serve_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second fresh environment: the runtime plus the serve extra (`pip install '.[serve]'`)."""
    return fresh_env(tmp_path_factory, "install-serve", "[serve]")


def test_runtime_with_the_serve_extra_serves_without_torch(serve_env: Path, tiny_bundle: Path,
                                                           tmp_path: Path) -> None:
    import base64
    import io

    httpx = pytest.importorskip("httpx")
    sys.path.insert(0, str(Path(__file__).parent / "serve"))
    from _serve_support import serve

    python = serve_env / "bin" / "python"
    run([str(python), "-c", "import importlib.util, segclip.runtime.serve; "
         "assert importlib.util.find_spec('torch') is None; "
         "assert importlib.util.find_spec('httptools') and importlib.util.find_spec('uvloop')"],
        timeout=120, cwd=tmp_path)
    with serve(tiny_bundle, tmp_path, program=[str(serve_env / "bin" / "segclip-serve")]) as server:
        buffer = io.BytesIO()
        Image.new("RGB", (96, 64), (200, 30, 30)).save(buffer, format="PNG")
        response = httpx.post(server.url + "/v1/segment", timeout=60, json={
            "image": base64.b64encode(buffer.getvalue()).decode(),
            "labels": ["red square", "cat"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (96, 64) and body["labels"] == ["red square", "cat"]
    label_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["label_map"]["data"]))))
    assert label_map.shape == (64, 96) and label_map.max() <= 2
