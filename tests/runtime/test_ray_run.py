"""`segclip-run --ray` (runtime/ray_run.py) against plain `segclip-run` on the tiny bundle: the
same files (label maps and overlays byte for byte, JSON equal apart from timings), per-image
errors, a run killed halfway and resumed with --skip-existing, file:// URIs, and the one-line
error without Ray. One in-process Ray (127.0.0.1, 2 CPUs) per module, stopped at the end; the
killed run's own Ray must leave no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from segclip.runtime.cli import app
from segclip.runtime.runner import run_images

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")

LABELS = ["red square", "blue circle", "cat"]
COUNT = 52
runner = CliRunner()


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray_run")
    folder = root / "photos"
    folder.mkdir()
    for index in range(COUNT):
        rng = np.random.default_rng(index)
        height, width = (int(v) for v in rng.integers(40, 110, 2))
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[:] = rng.integers(0, 255, 3)
        pixels[height // 4: height // 2, width // 3: 2 * width // 3] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(folder / f"photo {index:03d}.png")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return {"folder": folder, "labels": root / "labels.txt", "root": root}


@pytest.fixture(scope="module")
def reference(tiny_bundle: Path, photos: dict[str, Path]) -> Path:
    out = photos["root"] / "plain"
    report = run_images(tiny_bundle, photos["labels"], [photos["folder"]], out, device="cpu",
                        progress=False)
    assert report.processed == COUNT and not report.failed
    return out


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def assert_same_results(out: Path, reference: Path) -> None:
    assert visible(out) == visible(reference)
    for path in reference.iterdir():
        if path.suffix in (".png", ".jpg"):
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
        elif path.suffix == ".json":
            ours, theirs = (json.loads(p.read_text()) for p in (out / path.name, path))
            for report in (ours, theirs):
                report.pop("timings_ms")
            assert ours == theirs, path.name


def run_cli(bundle: Path, photos: dict[str, Path], out: Path, *args: str):
    return runner.invoke(app, ["--engine", str(bundle), "--labels", str(photos["labels"]),
                               "--out", str(out), "--device", "cpu", "--quiet", "--ray",
                               *args, str(photos["folder"])])


def test_actor_pool_writes_the_files_of_segclip_run(local_ray, tiny_bundle: Path,
                                                     photos: dict[str, Path],
                                                     reference: Path) -> None:
    out = photos["root"] / "ray"
    result = run_cli(tiny_bundle, photos, out, "--actors", "2", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    assert_same_results(out, reference)
    table = result.stdout.splitlines()
    assert table[1].split()[:4] == [str(COUNT), str(COUNT), "0", "0"]
    assert "onnxruntime/CPUExecutionProvider" in table[1]
    again = run_cli(tiny_bundle, photos, out, "--actors", "2", "--skip-existing")
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[1].split()[:4] == [str(COUNT), "0", str(COUNT), "0"]


def test_bad_image_fails_alone(local_ray, tiny_bundle: Path, photos: dict[str, Path],
                               tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("photo 000.png", "photo 001.png"):
        (folder / name).write_bytes((photos["folder"] / name).read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["--engine", str(tiny_bundle), "--labels", str(photos["labels"]),
                                 "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet",
                                 "--ray", str(folder)])
    assert result.exit_code == 2, result.output
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and "broken.png" in errors[0] and "1 of 3 images failed" in errors[1]
    assert visible(tmp_path / "out") == sorted(
        f"photo_00{i}{s}" for i in (0, 1) for s in (".json", ".png", "_overlay.jpg"))


def test_uri_input_and_output(local_ray, tiny_bundle: Path, photos: dict[str, Path],
                              reference: Path, tmp_path: Path) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    names = [f"photo_{i:03d}" for i in range(4)]  # URIs have no spaces
    for name in names:
        source = photos["folder"] / f"{name.replace('_', ' ')}.png"
        (folder / f"{name}.png").write_bytes(source.read_bytes())
    out = tmp_path / "out"
    scratch = set(Path(tempfile.gettempdir()).glob("segclip-ray-*"))  # the actors' staging
    result = runner.invoke(app, ["--engine", str(tiny_bundle), "--labels", str(photos["labels"]),
                                 "--out", f"file://{out}", "--device", "cpu", "--quiet",
                                 "--ray", f"file://{folder}"])
    assert result.exit_code == 0, result.output
    assert set(Path(tempfile.gettempdir()).glob("segclip-ray-*")) <= scratch, "staging left"
    for stem in names:
        assert (out / f"{stem}.png").read_bytes() == (reference / f"{stem}.png").read_bytes()
        report = json.loads((out / f"{stem}.json").read_text())
        assert report["image"] == f"file://{folder}/{stem}.png"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    again = runner.invoke(app, ["--engine", str(tiny_bundle), "--labels", str(photos["labels"]),
                                "--out", f"file://{out}", "--device", "cpu", "--quiet", "--ray",
                                "--skip-existing", f"file://{folder}"])
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[1].split()[:4] == ["4", "0", "4", "0"]


def _ray_processes(marker: str) -> list[int]:
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True,
                             check=True).stdout
    return [int(line.split(None, 1)[0]) for line in listing.splitlines()
            if marker in line and str(os.getpid()) != line.split(None, 1)[0]]


def test_killed_run_resumes_with_nothing_lost_or_duplicated(
        local_ray, tiny_bundle: Path, photos: dict[str, Path], reference: Path) -> None:
    out = photos["root"] / "killed"
    ray_tmp = tempfile.mkdtemp(prefix="sgr", dir="/tmp")  # short: Ray's socket paths
    command = [sys.executable, "-m", "segclip.runtime.cli", "--engine", str(tiny_bundle),
               "--labels", str(photos["labels"]), "--out", str(out), "--device", "cpu",
               "--quiet", "--ray", "--actors", "1", "--batch-size", "1",
               str(photos["folder"])]
    process = subprocess.Popen(command, env={**os.environ, "RAY_TMPDIR": ray_tmp},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if len(list(out.glob("*.json"))) >= 5:
                break
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        os.killpg(process.pid, signal.SIGKILL)  # the driver and anything in its session
    finally:
        process.wait(timeout=30)
        process.stdout.close(), process.stderr.close()
    deadline = time.monotonic() + 30  # Ray's reaper stops the killed driver's cluster
    while _ray_processes(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = _ray_processes(ray_tmp)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"Ray processes of the killed run survived: {survivors}"
    done_before = len(list(out.glob("*.json")))  # its actor may finish one image meanwhile
    assert 5 <= done_before < COUNT

    result = run_cli(tiny_bundle, photos, out, "--actors", "2", "--skip-existing")
    assert result.exit_code == 0, result.output
    row = result.stdout.splitlines()[1].split()
    assert row[:4] == [str(COUNT), str(COUNT - done_before), str(done_before), "0"]
    assert_same_results(out, reference)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert all(name.endswith(".tmp") for name in leftovers), leftovers


def test_without_ray_installed_one_line(tiny_bundle: Path, photos: dict[str, Path],
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = run_cli(tiny_bundle, photos, tmp_path / "out")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'segclip[ray]'" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_user_errors_are_one_line_before_ray_starts(tiny_bundle: Path, photos: dict[str, Path],
                                                    tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    cases = [(["--labels", str(empty)], "label"),
             (["--labels", str(photos["labels"]), "--actors", "0"], "--actors"),
             (["--labels", str(photos["labels"]), str(tmp_path / "nope.png")], "nope.png")]
    for args, fragment in cases:
        result = runner.invoke(app, ["--engine", str(tiny_bundle), "--out", str(tmp_path / "o"),
                                     "--quiet", "--ray", *args, str(photos["folder"])])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    for args, fragment in ((["--actors", "2"], "--actors only apply with --ray"),
                           (["--address", "auto"], "--address only apply with --ray")):
        result = runner.invoke(app, ["--engine", str(tiny_bundle), "--labels",
                                     str(photos["labels"]), "--out", str(tmp_path / "o"),
                                     "--quiet", *args, str(photos["folder"])])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_gpus_this_ray_lacks_are_refused(local_ray, tiny_bundle: Path, photos: dict[str, Path],
                                         tmp_path: Path) -> None:
    result = run_cli(tiny_bundle, photos, tmp_path / "out", "--num-gpus", "1")
    assert result.exit_code == 2, result.output
    assert "asks for 1 GPU(s) but this machine's Ray has 0" in result.stderr
    assert not (tmp_path / "out").exists()
