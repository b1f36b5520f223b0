"""The TensorRT builder: option parsing and missing-dependency errors here; the build itself on a
GPU with TensorRT (`gpu` marker), and its call sequence against a stand-in `tensorrt` module that
mimics the TensorRT 10 / 11 Python API surface used (no engine is built by the stand-in)."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from segclip.errors import MissingDependencyError
from segclip.export import ExportError
from segclip.export.tensorrt_build import Profile, build_engines
from segclip.runtime import contract


def test_profile_parse() -> None:
    assert Profile.parse("1:4:16") == Profile(1, 4, 16)
    assert Profile.parse("2:2:2").shapes((3, 64, 64)) == ((2, 3, 64, 64),) * 3
    for bad in ("1:4", "0:1:2", "4:2:8", "a:b:c", "1:2:3:4"):
        with pytest.raises(ExportError, match="MIN:OPT:MAX"):
            Profile.parse(bad, "--batch")


def test_without_tensorrt_the_error_names_the_install(bundle: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(MissingDependencyError, match=r"TensorRT is not installed.*"
                                                     r"pip install 'segclip\[gpu\]'"):
        build_engines(bundle)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not a segclip bundle"):
        build_engines(tmp_path)


# ---- stand-in tensorrt --------------------------------------------------------------------------
class _Enum:
    def __init__(self, **members: Any) -> None:
        self.__dict__.update(members)


def _fake_tensorrt(calls: list[tuple], with_fp16_flag: bool) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.9.0" if with_fp16_flag else "11.0.0"
    trt.float32, trt.float16, trt.int64 = "DataType.FLOAT", "DataType.HALF", "DataType.INT64"
    flags = {"PREFER_PRECISION_CONSTRAINTS": "prefer"}
    if with_fp16_flag:
        flags["FP16"] = "fp16"
    trt.BuilderFlag = _Enum(**flags)
    trt.NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=5)
    trt.MemoryPoolType = _Enum(WORKSPACE="workspace")
    trt.LayerType = _Enum(NORMALIZATION="norm", SOFTMAX="softmax", REDUCE="reduce",
                          MATRIX_MULTIPLY="matmul")

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    class Tensor:
        def __init__(self, name: str, dtype: str) -> None:
            self.name, self.dtype = name, dtype

    class Layer:
        def __init__(self, kind: str) -> None:
            self.type, self.precision, self.num_outputs = kind, None, 1
            self.out_types: dict[int, str] = {}

        def get_output(self, i: int) -> Tensor:
            return Tensor("o", trt.float32)

        def set_output_type(self, i: int, dtype: str) -> None:
            self.out_types[i] = dtype

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.inputs, self.outputs = flags, [], []
            self.layers = [Layer("norm"), Layer("matmul"), Layer("softmax")]
            self.num_layers = len(self.layers)

        def get_layer(self, i: int) -> Layer:
            return self.layers[i]

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        @property
        def num_outputs(self) -> int:
            return len(self.outputs)

        def get_input(self, i: int) -> Tensor:
            return self.inputs[i]

        def get_output(self, i: int) -> Tensor:
            return self.outputs[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            calls.append(("parse", Path(path).name, self.network.flags))
            if Path(path).name.startswith("text"):
                self.network.inputs = [Tensor(contract.TEXT_INPUT, trt.int64)]
                self.network.outputs = [Tensor(contract.TEXT_OUTPUT, trt.float32)]
            else:
                self.network.inputs = [Tensor(contract.IMAGE_INPUT, trt.float32)]
                self.network.outputs = [Tensor(n, trt.float32) for n in contract.IMAGE_OUTPUTS]
            return True

    class Profile_:
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            calls.append(("profile", name, lo, opt, hi))

    class Cache:
        def serialize(self) -> bytes:
            return b"timing-cache"

    class Config:
        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            calls.append(("workspace", size))

        def add_optimization_profile(self, profile: Profile_) -> None:
            pass

        def set_flag(self, flag: str) -> None:
            calls.append(("flag", flag))

        def create_timing_cache(self, data: bytes) -> Cache:
            calls.append(("cache_in", bytes(data)))
            return Cache()

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> None:
            self.cache = cache

        def get_timing_cache(self) -> Cache:
            return self.cache

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile_:
            return Profile_()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            return b"plan:" + network.inputs[0].name.encode()

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


@pytest.mark.parametrize("with_fp16_flag", [True, False], ids=["trt10", "trt11"])
def test_build_sequence_with_stand_in_tensorrt(bundle: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               with_fp16_flag: bool) -> None:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    calls: list[tuple] = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(calls, with_fp16_flag))
    monkeypatch.setattr("segclip.export.tensorrt_build.gpu_facts",
                        lambda: {"gpu": "Stand-in GPU", "compute_capability": "9.0"})
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    entries = build_engines(target, fp16=True, batch=Profile(1, 2, 4), labels=Profile(1, 8, 64),
                            workspace_gib=0.5, timing_cache=cache)
    assert (target / contract.IMAGE_PLAN).read_bytes() == b"plan:image"
    assert (target / contract.TEXT_PLAN).read_bytes() == b"plan:tokens"
    assert cache.read_bytes() == b"timing-cache" and ("cache_in", b"old") in calls
    assert ("profile", "image", (1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64)) in calls
    assert ("profile", "tokens", (1, 77), (8, 77), (64, 77)) in calls
    assert ("workspace", 1 << 29) in calls
    parsed = [c for c in calls if c[0] == "parse"]
    if with_fp16_flag:  # TRT 10: fp32 graph + FP16 flag, norms pinned
        assert parsed == [("parse", contract.IMAGE_ONNX, 0), ("parse", contract.TEXT_ONNX, 0)]
        assert ("flag", "fp16") in calls and ("flag", "prefer") in calls
    else:  # TRT 11: strongly typed from the fp16 graph
        assert parsed == [("parse", contract.IMAGE_FP16_ONNX, 1 << 5),
                          ("parse", contract.TEXT_ONNX, 0)]
        assert not [c for c in calls if c[0] == "flag"]
    manifest = json.loads((target / contract.MANIFEST_FILE).read_text())
    assert manifest["engines"] == entries
    image, text = entries
    assert image["tower"] == "image" and image["precision"] == "fp16"
    assert text["tower"] == "text" and text["precision"] == "fp32"
    assert image["profile"] == {"input": "image", "min": 1, "opt": 2, "max": 4}
    assert text["io_dtypes"] == {"tokens": "INT64", "text": "FLOAT"}
    for entry in entries:
        assert entry["gpu"] == "Stand-in GPU" and entry["compute_capability"] == "9.0"
        assert entry["tensorrt"] == ("10.9.0" if with_fp16_flag else "11.0.0")
    # a rebuild replaces the entries instead of appending
    build_engines(target, batch=Profile(1, 1, 1))
    manifest = json.loads((target / contract.MANIFEST_FILE).read_text())
    assert [e["tower"] for e in manifest["engines"]] == ["image", "text"]
    assert manifest["engines"][0]["precision"] == "fp32"


# ---- real TensorRT ------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("fp16", [False, True])
def test_build_real_engines(bundle: Path, tmp_path: Path, fp16: bool) -> None:
    trt = pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    cache = tmp_path / "timing.cache"
    entries = build_engines(target, fp16=fp16, batch=Profile(1, 2, 4),
                            labels=Profile(1, 4, 16), workspace_gib=1.0, timing_cache=cache)
    assert cache.stat().st_size > 0
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for entry, names in zip(entries, ([contract.IMAGE_INPUT, *contract.IMAGE_OUTPUTS],
                                      [contract.TEXT_INPUT, contract.TEXT_OUTPUT])):
        engine = runtime.deserialize_cuda_engine((target / entry["file"]).read_bytes())
        assert engine is not None
        found = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        assert sorted(found) == sorted(names)
        assert entry["tensorrt"] == trt.__version__
        assert entry["gpu"] == torch.cuda.get_device_name(0)
    assert entries[0]["precision"] == ("fp16" if fp16 else "fp32")
