"""segclip.runtime.bundle: reading and validating segclip.json against the bundle's files and
graphs; refusing TensorRT engines from another TensorRT version or GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from segclip.errors import SegclipError
from segclip.runtime.bundle import Bundle, EngineFacts
from segclip.runtime.errors import BundleError, EngineError

PRESENT = EngineFacts(tensorrt="10.9.0.34", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")


def copy_bundle(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(source, target)
    return target


def edit_manifest(root: Path, **changes: Any) -> dict[str, Any]:
    path = root / "segclip.json"
    manifest = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = manifest
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    path.write_text(json.dumps(manifest))
    return manifest


def add_engine(root: Path, tower: str = "image", **facts: Any) -> None:
    (root / f"{tower}.plan").write_bytes(b"not really a plan")
    manifest = json.loads((root / "segclip.json").read_text())
    entry = {"tower": tower, "file": f"{tower}.plan", "precision": "fp16",
             "tensorrt": PRESENT.tensorrt, "gpu": PRESENT.gpu,
             "compute_capability": PRESENT.compute_capability,
             "profile": {"input": "image", "min": 1, "opt": 4, "max": 16}}
    entry.update(facts)
    manifest["engines"].append(entry)
    (root / "segclip.json").write_text(json.dumps(manifest))


def test_open_reads_the_model_facts(tiny_bundle: Path, tiny_bundle_model: Any) -> None:
    bundle = Bundle.open(tiny_bundle)
    config = tiny_bundle_model.config
    assert (bundle.image_size, bundle.patch_size, bundle.grid_size) == (64, 8, 8)
    assert (bundle.num_centers, bundle.embed_dim) == (config.num_centers, config.embed_dim)
    assert bundle.context_length == config.context_length == 77
    assert bundle.logit_scale == pytest.approx(float(tiny_bundle_model.scale().detach()), rel=1e-6)
    assert bundle.template == "a photo of a {}." and bundle.top_k == 5
    assert bundle.image_onnx("fp16").name == "image.fp16.onnx"
    assert bundle.engines == {} and bundle.requested_engine is None
    assert len(bundle.manifest_sha256) == 64


@pytest.mark.parametrize("name, engine, variant", [("image.onnx", "onnx", "fp32"),
                                                   ("image.fp16.onnx", "onnx", "fp16"),
                                                   ("segclip.json", None, None)])
def test_open_accepts_a_file_of_the_bundle(tiny_bundle: Path, name: str, engine: str | None,
                                           variant: str | None) -> None:
    bundle = Bundle.open(tiny_bundle / name)
    assert bundle.root == tiny_bundle
    assert (bundle.requested_engine, bundle.requested_variant) == (engine, variant)


def test_graph_io_matches_the_manifest(tiny_bundle: Path) -> None:
    Bundle.open(tiny_bundle).verify_graphs()  # raises on any mismatch


def test_missing_path_and_non_bundles(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"does not exist; pass a bundle directory .*"
                                          r"segclip-export onnx CKPT --out"):
        Bundle.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"is not a segclip bundle: it has no segclip\.json; "
                                          r"create one with segclip-export onnx CKPT --out"):
        Bundle.open(tmp_path / "empty")
    (tmp_path / "labels.txt").write_text("cat\n")
    with pytest.raises(BundleError, match=r"labels\.txt is not a segclip bundle"):
        Bundle.open(tmp_path / "labels.txt")


def test_corrupt_and_foreign_manifests(tiny_bundle: Path, tmp_path: Path) -> None:
    root = copy_bundle(tiny_bundle, tmp_path)
    (root / "segclip.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"cannot read .*segclip\.json.*re-export"):
        Bundle.open(root)
    (root / "segclip.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(BundleError, match=r"format 'something-else', expected 'segclip-bundle'"):
        Bundle.open(root)


@pytest.mark.parametrize("version, fix", [(2, "upgrade segclip"), (0, "re-export it"),
                                          ("1", "re-export it")])
def test_wrong_version(tiny_bundle: Path, tmp_path: Path, version: Any, fix: str) -> None:
    root = copy_bundle(tiny_bundle, tmp_path)
    edit_manifest(root, version=version)
    with pytest.raises(BundleError, match=rf"bundle version {version!r} is not supported .*{fix}"):
        Bundle.open(root)


def test_missing_and_truncated_files(tiny_bundle: Path, tmp_path: Path) -> None:
    root = copy_bundle(tiny_bundle, tmp_path)
    (root / "text.onnx").unlink()
    with pytest.raises(BundleError, match=r"text\.onnx is missing \(listed as files\.text.*"
                                          r"re-export it with segclip-export onnx"):
        Bundle.open(root)
    shutil.copy(tiny_bundle / "text.onnx", root / "text.onnx")
    data = (root / "image.onnx").read_bytes()
    (root / "image.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=r"image\.onnx is \d+ bytes but segclip\.json records "
                                          r"\d+: the file is truncated"):
        Bundle.open(root)


@pytest.mark.parametrize("change, message", [
    ({"model__image_size": 60}, r"image_size 60 is not a multiple of model\.patch_size 8"),
    ({"model__logit_scale": 150.0}, r"model\.logit_scale must be a number in \[1e-06, 100\.0\]"),
    ({"model__embed_dim": None}, r"model\.embed_dim must be a positive integer, got None"),
    ({"preprocessing__stride": 32}, r"preprocessing\.stride is 32"),
    ({"inference__template": "a photo"}, r"inference\.template must be a string with one \{\}"),
    ({"files__tokenizer": "../tokenizer.json"}, r"files\.tokenizer must be a plain file name"),
])
def test_inconsistent_facts(tiny_bundle: Path, tmp_path: Path, change: dict,
                            message: str) -> None:
    root = copy_bundle(tiny_bundle, tmp_path)
    edit_manifest(root, **change)
    with pytest.raises(BundleError, match=message):
        Bundle.open(root)


def test_manifest_disagreeing_with_the_graph(tiny_bundle: Path, tmp_path: Path) -> None:
    root = copy_bundle(tiny_bundle, tmp_path)
    edit_manifest(root, model__embed_dim=32)
    bundle = Bundle.open(root)  # the manifest alone is consistent
    with pytest.raises(BundleError, match=r"image\.onnx: output 'global' has shape "
                                          r"\[batch, 64\], but segclip\.json implies \[N, 32\].*"
                                          r"re-export with segclip-export onnx"):
        bundle.verify_graphs()


def test_missing_variant(tiny_bundle: Path) -> None:
    with pytest.raises(BundleError, match=r"no int8 image graph .*segclip-export onnx CKPT "
                                          r"--int8 --out"):
        Bundle.open(tiny_bundle).image_onnx("int8")


@pytest.mark.parametrize("field, recorded", [("tensorrt", "10.3.0.26"),
                                             ("gpu", "NVIDIA A100-SXM4-80GB"),
                                             ("compute_capability", "8.0")])
def test_engine_from_another_tensorrt_or_gpu_is_refused(tiny_bundle: Path, tmp_path: Path,
                                                        field: str, recorded: str) -> None:
    root = copy_bundle(tiny_bundle, tmp_path)
    add_engine(root, **{field: recorded})
    bundle = Bundle.open(root)
    with pytest.raises(EngineError, match=rf"image\.plan was built for .*{recorded}.*Rebuild on "
                                          rf"this machine with segclip-export trt .*bundle "
                                          rf"--fp16"):
        bundle.check_engine("image", PRESENT)


def test_matching_engine_is_accepted(tiny_bundle: Path, tmp_path: Path) -> None:
    root = copy_bundle(tiny_bundle, tmp_path)
    add_engine(root)
    info = Bundle.open(root / "image.plan").check_engine("image", PRESENT)
    assert info.profile == (1, 4, 16) and info.precision == "fp16"


def test_plan_path_without_a_recorded_engine(tiny_bundle: Path, tmp_path: Path) -> None:
    root = copy_bundle(tiny_bundle, tmp_path)
    (root / "image.plan").write_bytes(b"stray")
    with pytest.raises(BundleError, match=r"no TensorRT image engine recorded .*build one with "
                                          r"segclip-export trt"):
        Bundle.open(root / "image.plan")


def test_errors_are_user_errors() -> None:
    assert issubclass(BundleError, SegclipError) and issubclass(BundleError, ValueError)
    assert issubclass(EngineError, SegclipError)
