"""segclip.runtime.backends.openvino and variant "auto": the same outputs as ONNX Runtime fp32,
clean refusals, the compile cache reused, thread safety, and `auto` picking a variant that
passed parity (runtime/variants.py)."""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from segclip.runtime import Segmenter  # noqa: E402
from segclip.runtime.backends import create_backend  # noqa: E402
from segclip.runtime.backends import openvino as ov_backend  # noqa: E402
from segclip.runtime.backends._auto import candidates  # noqa: E402
from segclip.runtime.backends.openvino import OpenVinoBackend, OpenVinoOptions  # noqa: E402
from segclip.runtime.bundle import Bundle  # noqa: E402
from segclip.runtime.errors import BackendUnavailableError, BundleError, EngineError  # noqa: E402
from segclip.runtime.variants import VARIANTS, parity_status  # noqa: E402

pytestmark = pytest.mark.openvino  # run in their own process by `make test`

BF16 = "BF16" in ov_backend.cpu_capabilities()[1]


@pytest.fixture(scope="module")
def ov_bundle(tiny_bundle: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory,
              ) -> Path:
    """`tiny_bundle` with its OpenVINO variants (ov-int8 calibrated on 16 scenes)."""
    from segclip.export.openvino import export_openvino

    root = tmp_path_factory.mktemp("ov") / "bundle"
    shutil.copytree(tiny_bundle, root)
    export_openvino(root, tiny_checkpoint, int8=True, samples=16)
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test compiles into its own cache folder (never the user's ~/.cache)."""
    monkeypatch.setenv("SEGCLIP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _windows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 64, 64)).astype(np.float32)


def _region_argmax(assign: np.ndarray) -> np.ndarray:
    return assign.argmax(axis=1)  # (B, h, w)


def test_ov_f32_matches_onnxruntime_fp32(ov_bundle: Path) -> None:
    ort = create_backend(ov_bundle, "cpu", variant="fp32")
    ov = create_backend(ov_bundle, "cpu", variant="ov-f32", threads=1)
    assert isinstance(ov, OpenVinoBackend) and ov.info()["precision"] == "f32"
    windows = _windows(3)
    want, got = ort.run_image(windows), ov.run_image(windows)
    for name in ("global_", "regions", "assign"):
        assert np.abs(getattr(got, name) - getattr(want, name)).max() <= 1e-4, name
    assert (_region_argmax(got.assign) == _region_argmax(want.assign)).mean() >= 0.999
    tokens = np.random.default_rng(1).integers(1, 1000, (5, 77)).astype(np.int64)
    assert np.abs(ov.run_text(tokens) - ort.run_text(tokens)).max() <= 1e-4
    assert ov.run_text(tokens[:0]).shape == (0, 64)


@pytest.mark.skipif(not BF16, reason="this CPU has no bf16 (OpenVINO capabilities)")
def test_ov_bf16_computes_in_bf16(ov_bundle: Path) -> None:
    f32 = create_backend(ov_bundle, "cpu", variant="ov-f32", threads=1)
    bf16 = create_backend(ov_bundle, "cpu", variant="ov-bf16", threads=1)
    assert bf16.info()["precision"] == "bf16" and bf16.provider.endswith("bf16")
    windows = _windows(2)
    diff = np.abs(bf16.run_image(windows).regions - f32.run_image(windows).regions).max()
    assert 1e-4 < diff < 0.2  # bf16 rounding is there, and small


def test_bf16_refused_where_the_cpu_lacks_it(ov_bundle: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ov_backend, "cpu_capabilities",
                        lambda core=None: ("Old CPU", ("FP32", "INT8")))
    with pytest.raises(BackendUnavailableError, match="ov-bf16 needs a CPU with bf16 support"):
        create_backend(ov_bundle, "cpu", variant="ov-bf16")
    int8 = create_backend(ov_bundle, "cpu", variant="ov-int8", threads=1)
    assert int8.info()["precision"] == "f32"  # its unquantised nodes: no bf16 here


@pytest.mark.skipif(not BF16, reason="this CPU has no bf16 (OpenVINO capabilities)")
def test_ov_int8_runs_its_unquantised_nodes_in_bf16(ov_bundle: Path) -> None:
    int8 = create_backend(ov_bundle, "cpu", variant="ov-int8", threads=1)
    assert int8.info()["precision"] == "bf16" and int8.provider.endswith("int8")
    assert ov_backend.inference_precision("ov-int8", ("FP32", "INT8")) == "f32"
    want = create_backend(ov_bundle, "cpu", variant="fp32").run_image(_windows(3))
    got = int8.run_image(_windows(3))
    assert (_region_argmax(got.assign) == _region_argmax(want.assign)).mean() >= 0.95


def test_refusals_are_one_clear_error(ov_bundle: Path, tiny_bundle: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BundleError, match=r"segclip-export openvino .* --int8"):
        create_backend(tiny_bundle, "cpu", variant="ov-int8")
    with pytest.raises(BackendUnavailableError, match="runs on the CPU"):
        create_backend(ov_bundle, "cuda", variant="ov-f32")
    with pytest.raises(EngineError, match="unknown variant 'ov-fp32'"):
        create_backend(ov_bundle, "cpu", variant="ov-fp32")
    with pytest.raises(EngineError, match="streams must be >= 1"):
        OpenVinoOptions(streams=0)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(BackendUnavailableError, match=r"pip install 'segclip\[openvino\]'"):
        create_backend(ov_bundle, "cpu", variant="ov-f32")


def test_compile_cache_is_reused_on_restart(ov_bundle: Path, _cache: Path) -> None:
    first = OpenVinoBackend(Bundle.open(ov_bundle), "ov-int8", OpenVinoOptions(threads=1))
    folder = Path(first.info()["cache_dir"])
    assert not first.loaded_from_cache and folder.parent.parent == _cache / "openvino"
    assert folder.name == "ov-int8"
    blobs = sorted(folder.glob("*.blob"))
    assert blobs, "no compiled model written to the cache"
    out = first.run_image(_windows(1)).regions
    first.close()
    second = OpenVinoBackend(Bundle.open(ov_bundle), "ov-int8", OpenVinoOptions(threads=1))
    assert second.loaded_from_cache and second.info()["loaded_from_cache"]
    assert sorted(folder.glob("*.blob")) == blobs  # nothing recompiled
    np.testing.assert_array_equal(second.run_image(_windows(1)).regions, out)


def test_variants_never_load_each_others_compiled_model(ov_bundle: Path, _cache: Path) -> None:
    """OpenVINO's cache key leaves out the precision: in one shared folder, ov-f32 compiled after
    ov-bf16 loaded the bf16 blob (and ov-bf16 after ov-f32 returned NaN) on a Xeon with AMX."""
    bundle, windows = Bundle.open(ov_bundle), _windows(2)
    first = "ov-bf16" if BF16 else "ov-int8"
    earlier = OpenVinoBackend(bundle, first, OpenVinoOptions(threads=1))
    earlier.run_image(windows)
    f32 = OpenVinoBackend(bundle, "ov-f32", OpenVinoOptions(threads=1))
    assert not f32.loaded_from_cache and f32.precision == "f32"
    assert Path(f32.info()["cache_dir"]).name == "ov-f32" != Path(earlier.cache_dir).name
    want = create_backend(ov_bundle, "cpu", variant="fp32").run_image(windows)
    got = f32.run_image(windows)
    for name in ("global_", "regions", "assign"):
        assert np.abs(getattr(got, name) - getattr(want, name)).max() <= 1e-4, name
    again = OpenVinoBackend(bundle, first, OpenVinoOptions(threads=1))
    assert again.loaded_from_cache and np.isfinite(again.run_image(windows).regions).all()


def test_threads_get_identical_results(ov_bundle: Path) -> None:
    backend = create_backend(ov_bundle, "cpu", variant="ov-f32", threads=1)
    images = [_windows(1, seed) for seed in range(50)]
    sequential = [backend.run_image(image) for image in images]

    def worker(offset: int) -> int:
        for step in range(50):
            index = (offset * 7 + step) % 50  # every thread in its own order
            got = backend.run_image(images[index])
            want = sequential[index]
            for name in ("global_", "regions", "assign"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        return 50

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(worker, range(8))) == 400


def _with_parity(source: Path, tmp_path: Path, **passed: bool) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(source, root)
    manifest = json.loads((root / "segclip.json").read_text())
    for variant, value in passed.items():
        manifest["openvino"]["variants"][variant.replace("_", "-")]["parity"]["passed"] = value
    (root / "segclip.json").write_text(json.dumps(manifest))
    return root


def test_auto_picks_the_fastest_variant_that_passed(ov_bundle: Path, tmp_path: Path) -> None:
    root = _with_parity(ov_bundle, tmp_path, ov_f32=True, ov_bf16=False, ov_int8=True)
    backend = create_backend(root, "cpu", variant="auto", threads=1)
    choice = backend.info()["auto"]
    assert set(choice["probe_ms"]) == {"fp32", "fp16", "ov-f32", "ov-int8"}
    assert choice["chosen"] == min(choice["probe_ms"], key=choice["probe_ms"].get)
    assert backend.info()["variant"] == choice["chosen"] and not choice["cached"]
    assert "parity failed" in choice["skipped"]["ov-bf16"]
    assert "not in the bundle" in choice["skipped"]["int8"]
    again = create_backend(root, "cpu", variant="auto", threads=1)  # restart: probe cached
    assert again.info()["auto"]["cached"] and again.info()["variant"] == choice["chosen"]


def test_auto_never_picks_a_failed_or_unmeasured_variant(ov_bundle: Path) -> None:
    bundle = Bundle.open(ov_bundle)
    names, skipped = candidates(bundle)
    for variant in VARIANTS[1:]:
        passed, _ = parity_status(bundle.manifest, variant)
        assert (variant in names) == (variant == "fp32" or (passed is True and variant
                                                            not in skipped))
    recorded = json.loads((ov_bundle / "segclip.json").read_text())["openvino"]["variants"]
    assert recorded["ov-f32"]["parity"]["passed"]  # the fp32 thresholds hold on OpenVINO f32
    with Segmenter(ov_bundle, device="cpu", variant="auto", threads=1) as seg:
        assert seg.backend_info["auto"]["chosen"] in names


def test_segmenter_runs_an_explicit_openvino_variant(ov_bundle: Path) -> None:
    image = (np.random.default_rng(3).random((70, 90, 3)) * 255).astype(np.uint8)
    labels = ["cat", "dog", "sky"]
    with Segmenter(ov_bundle, device="cpu", variant="fp32") as ort:
        want = ort.segment(image, labels).label_map
    with Segmenter(ov_bundle, device="cpu", variant="ov-f32", threads=1) as seg:
        result = seg.segment(image, labels)
        assert result.backend.startswith("openvino/OpenVINO") and "f32" in result.backend
        assert seg.backend_info["variant"] == "ov-f32"
    assert (result.label_map == want).mean() >= 0.999


def test_info_reports_threads_streams_and_files(ov_bundle: Path) -> None:
    backend = OpenVinoBackend(Bundle.open(ov_bundle), "ov-int8",
                              OpenVinoOptions(threads=1, streams=2))
    info: dict[str, Any] = backend.info()
    assert info["requested"] == {"threads": 1, "streams": 2}
    assert info["threads"] == 1 and 1 <= info["streams"] <= 2  # OpenVINO caps streams by cores
    assert (info["image"], info["text"], info["text_precision"]) == (
        "image.ov-int8.xml", "text.onnx", "f32")
    backend.close()
    with pytest.raises(EngineError, match="closed"):
        backend.run_image(_windows(1))


def test_the_int8_ir_path_opens_the_openvino_variant(ov_bundle: Path) -> None:
    backend = create_backend(ov_bundle / "image.ov-int8.xml", "auto", threads=1)
    assert isinstance(backend, OpenVinoBackend) and backend.info()["variant"] == "ov-int8"
    with pytest.raises(BackendUnavailableError, match="runs on the CPU"):
        create_backend(ov_bundle / "image.ov-int8.xml", "cuda")


def test_auto_fails_in_one_line_when_nothing_loads(ov_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(ov_bundle, root)
    manifest = json.loads((root / "segclip.json").read_text())
    (root / "image.onnx").write_bytes(b"not a graph")  # same name, so Bundle.open passes
    manifest["file_bytes"].pop("image.onnx")
    for variant in ("ov-bf16", "ov-int8"):
        manifest["openvino"]["variants"][variant]["parity"]["passed"] = False
    manifest["files"].pop("image_fp16")
    (root / "segclip.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=r"variant auto: no CPU variant .*fp32: ONNX Runtime "
                                          r"cannot load"):
        create_backend(root, "cpu", variant="auto", threads=1)
