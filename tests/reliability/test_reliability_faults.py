"""Faults: processes killed with SIGKILL at seeded-random moments, and while they write,
never leave a file or bundle that looks complete but is not, and a rerun finishes the work.

- segclip-train: whatever `ckpt.pt` exists after a kill loads; `--resume` continues from it and
  the finished run equals an uninterrupted one bit for bit.
- segclip-export onnx: the target directory is absent, the previous bundle, or a complete new
  one; never a partial bundle with a manifest.
- segclip-run: see test_reliability_runtime_faults.py.

Hidden temp files / staging folders of killed writes are left behind (nothing removes them on the
next start); they never carry the target's name. No hooks in production code: the tests only
watch the files and kill the process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN_STEPS = 24
TRAIN_ARGS = ["--config", "tiny", "--recipe", "synth", "--steps", str(TRAIN_STEPS),
              "--batch-size", "2", "--ckpt-every", "1", "--log-every", "1"]
KILL_MODES = ("ckpt-write", "state-write", "random", "ckpt-write", "state-write", "random",
              "state-write", "random")


def _cli(module_app: str, *args: object) -> list[str]:
    """A command line running a typer app in a fresh interpreter."""
    module, name = module_app.split(":")
    code = f"import sys; from {module} import {name}; sys.exit({name}())"
    return [sys.executable, "-c", code, *map(str, args)]


def _train_command(world: Path, run: Path, resume: bool) -> list[str]:
    return _cli("segclip.cli.train:app", "--data", world, "--out", run, "--quiet",
                *(["--resume"] if resume else TRAIN_ARGS))


def _temp_files(folder: Path, prefix: str) -> set[str]:
    return {p.name for p in folder.glob(f".{prefix}*.tmp")} if folder.is_dir() else set()


def _kill_when(process: subprocess.Popen, folder: Path, mode: str, rng: random.Random,
               timeout: float = 90.0) -> str:
    """SIGKILL `process` according to `mode`; returns what was happening when it died."""
    start = time.monotonic()
    if mode == "random":
        delay = rng.uniform(0.5, 7.0)
        while process.poll() is None and time.monotonic() - start < delay:
            time.sleep(0.01)
        what = f"at {delay:.2f} s"
    else:  # while a new temp file of ckpt.pt / train_state.pt is being written
        prefix = "ckpt.pt." if mode == "ckpt-write" else "train_state.pt."
        stale = _temp_files(folder, prefix)
        skip = rng.randint(0, 3)  # let a few saves go by, so kills fall at different steps
        seen: set[str] = set()
        what = f"{mode}: process ended first"
        while process.poll() is None and time.monotonic() - start < timeout:
            fresh = _temp_files(folder, prefix) - stale - seen
            if fresh:
                if len(seen) >= skip:
                    what = f"{mode}: during {sorted(fresh)[0]}"
                    break
                seen |= fresh
            time.sleep(0.003)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return what


@dataclass
class Campaign:
    """What the repeated kills of one training run observed."""

    events: list[str] = field(default_factory=list)
    unloadable: list[str] = field(default_factory=list)  # ckpt.pt that failed to load
    failed_resumes: list[str] = field(default_factory=list)  # resume runs that exited with 2
    final_returncode: int | None = None
    final_stderr: str = ""
    run: Path | None = None
    reference: Path | None = None


@pytest.fixture(scope="module")
def sigkill_training(synth_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    from segclip.checkpoint import load_checkpoint
    from segclip.errors import SegclipError

    root = tmp_path_factory.mktemp("sigkill_train")
    campaign = Campaign(run=root / "run", reference=root / "reference")
    reference = subprocess.run(_train_command(synth_world, campaign.reference, resume=False),
                               env=ENV, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    rng = random.Random(7)
    run = campaign.run
    for attempt, mode in enumerate(KILL_MODES):
        resume = (run / "ckpt.pt").exists() or (run / "train_state.pt").exists()
        process = subprocess.Popen(_train_command(synth_world, run, resume), env=ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        what = _kill_when(process, run, mode, rng)
        stderr = process.stderr.read().decode(errors="replace").strip()
        process.stderr.close()
        step = None
        if (run / "ckpt.pt").exists():
            try:
                load_checkpoint(run / "ckpt.pt")
                step = torch.load(run / "ckpt.pt", weights_only=True)["meta"]["step"]
            except SegclipError as e:
                campaign.unloadable.append(f"attempt {attempt} ({what}): {e}")
        if process.returncode == 2:
            campaign.failed_resumes.append(f"attempt {attempt} ({what}): {stderr}")
        campaign.events.append(f"attempt {attempt} resume={resume} {what} "
                               f"rc={process.returncode} ckpt step={step}")
        if process.returncode == 0:
            break
    final = subprocess.run(_train_command(synth_world, run, resume=True), env=ENV,
                           capture_output=True, text=True, timeout=300)
    campaign.final_returncode, campaign.final_stderr = final.returncode, final.stderr.strip()
    return campaign


def test_sigkilled_training_always_leaves_a_loadable_checkpoint(
        sigkill_training: Campaign) -> None:
    assert sigkill_training.unloadable == [], "\n".join(sigkill_training.events)
    assert any("during" in e for e in sigkill_training.events), sigkill_training.events


def test_resume_after_sigkill_continues_and_matches_an_uninterrupted_run(
        sigkill_training: Campaign) -> None:
    campaign = sigkill_training
    history = "\n".join(campaign.events)
    assert campaign.failed_resumes == [], f"{campaign.failed_resumes}\n{history}"
    assert campaign.final_returncode == 0, f"{campaign.final_stderr}\n{history}"
    done = torch.load(campaign.run / "ckpt.pt", weights_only=True)
    want = torch.load(campaign.reference / "ckpt.pt", weights_only=True)
    assert done["meta"]["step"] == TRAIN_STEPS
    different = [k for k in want["state_dict"]
                 if not torch.equal(done["state_dict"][k], want["state_dict"][k])]
    assert different == [], f"resumed weights differ from the uninterrupted run: {different[:5]}"
    steps = [json.loads(line)["step"]
             for line in (campaign.run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TRAIN_STEPS + 1))  # each step logged once, in order


# ---- segclip-export onnx ----------------------------------------------------------------------
def _looks_complete(folder: Path) -> bool:
    return (folder / "segclip.json").is_file()


def _check_complete_bundle(folder: Path) -> None:
    """A folder with segclip.json must be a whole, verified bundle."""
    from segclip.runtime.bundle import Bundle

    manifest = json.loads((folder / "segclip.json").read_text())
    assert manifest["parity"]["passed"] is True
    for name, size in manifest["file_bytes"].items():
        assert (folder / name).stat().st_size == size, name
    Bundle.open(folder)  # the runtime's own completeness checks


def test_sigkilled_export_never_leaves_a_partial_bundle(tiny_checkpoint: Path,
                                                        tmp_path: Path) -> None:
    from _reliability_support import snapshot

    rng = random.Random(3)
    target = tmp_path / "bundle"
    old: dict[str, str] = {}
    outcomes = []
    for attempt in range(6):
        process = subprocess.Popen(_cli("segclip.export.cli:app", "onnx", tiny_checkpoint,
                                        "--out", target), env=ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.monotonic()
        if attempt % 2:  # kill while the hidden staging directory is being filled
            delay = rng.uniform(0.0, 1.2)
            while process.poll() is None and not list(tmp_path.glob(".bundle.partial-*")):
                time.sleep(0.005)
            time.sleep(delay)
        else:
            delay = rng.uniform(1.0, 6.0)
            while process.poll() is None and time.monotonic() - start < delay:
                time.sleep(0.01)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        outcomes.append((attempt, round(delay, 2), process.returncode))
        if target.exists():
            assert _looks_complete(target), f"attempt {attempt}: partial bundle {outcomes}"
            _check_complete_bundle(target)
            now = snapshot(target)
            # the same checkpoint gives the same graphs; only the manifest's timings may differ
            same = {k: v for k, v in now.items() if k != "segclip.json"}
            assert not old or same == {k: v for k, v in old.items() if k != "segclip.json"}
            old = now
    assert any(rc == -signal.SIGKILL for _, _, rc in outcomes), outcomes
    # a rerun after the kills always succeeds and leaves a complete bundle
    rerun = subprocess.run(_cli("segclip.export.cli:app", "onnx", tiny_checkpoint, "--out",
                                target), env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    _check_complete_bundle(target)
