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
from segclip.export.errors import EngineBuildError
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
# Mirrors the TensorRT 10/11 Python bindings (NVIDIA/TensorRT python/src/infer/pyCore.cpp,
# parsers/pyOnnx.cpp): failures come back as return values, not exceptions -- parse_from_file ->
# False (+ get_error(i)), add_optimization_profile -> -1, set_timing_cache -> False (then
# get_timing_cache() -> None), build_serialized_network -> None; set_shape raises on inconsistent
# shapes.
FOREIGN_CACHE = b"cache from another GPU"


class _Enum:
    def __init__(self, **members: Any) -> None:
        self.__dict__.update(members)


def _fake_tensorrt(calls: list[tuple], with_fp16_flag: bool, typed_flag: bool = True,
                   parse_errors: tuple[str, ...] = (), build_fails: bool = False,
                   profile_rejected: bool = False) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.9.0" if with_fp16_flag else "11.0.0"
    trt.float32, trt.float16, trt.int64 = "DataType.FLOAT", "DataType.HALF", "DataType.INT64"
    flags = {"PREFER_PRECISION_CONSTRAINTS": "prefer"}
    if with_fp16_flag:
        flags["FP16"] = "fp16"
    trt.BuilderFlag = _Enum(**flags)
    # TensorRT 11 deprecates STRONGLY_TYPED (ignored); typed_flag=False: a release without it
    trt.NetworkDefinitionCreationFlag = _Enum(**({"STRONGLY_TYPED": 5} if typed_flag else {}))
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

    class ParserError:
        def __init__(self, text: str) -> None:
            self.text = text

        def __str__(self) -> str:  # the bindings define __str__ on ParserError
            return self.text

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network, self.errors = network, [ParserError(e) for e in parse_errors]

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> ParserError:
            return self.errors[index]

        def parse_from_file(self, model: str) -> bool:
            calls.append(("parse", Path(model).name, self.network.flags))
            if Path(model).name.startswith("text"):
                self.network.inputs = [Tensor(contract.TEXT_INPUT, trt.int64)]
                self.network.outputs = [Tensor(contract.TEXT_OUTPUT, trt.float32)]
            else:
                self.network.inputs = [Tensor(contract.IMAGE_INPUT, trt.float32)]
                self.network.outputs = [Tensor(n, trt.float32) for n in contract.IMAGE_OUTPUTS]
            return not self.errors

    class OptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, input: str, min: tuple, opt: tuple, max: tuple) -> None:
            if not (len(min) == len(opt) == len(max)
                    and all(a <= b <= c for a, b, c in zip(min, opt, max))):
                raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
            self.shapes[input] = (min, opt, max)
            calls.append(("profile", input, min, opt, max))

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:  # real: an IHostMemory (buffer protocol)
            return b"timing-cache"

    class Config:
        def __init__(self) -> None:
            self.cache: TimingCache | None = None
            self.profiles: list[OptimizationProfile] = []

        def set_memory_pool_limit(self, pool: str, pool_size: int) -> None:
            calls.append(("workspace", pool_size))

        def add_optimization_profile(self, profile: OptimizationProfile) -> int:
            if profile_rejected or not profile.shapes:
                return -1
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_flag(self, flag: str) -> None:
            calls.append(("flag", flag))

        def create_timing_cache(self, serialized_timing_cache: bytes) -> TimingCache:
            calls.append(("cache_in", bytes(serialized_timing_cache)))
            return TimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if cache.data == FOREIGN_CACHE and not ignore_mismatch:
                return False  # verification header mismatch: nothing attached
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int = 0) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> OptimizationProfile:
            return OptimizationProfile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            calls.append(("build", network.inputs[0].name))
            if build_fails or not config.profiles:  # dynamic inputs need a profile
                return None
            return b"plan:" + network.inputs[0].name.encode()

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


def _stand_in(monkeypatch: pytest.MonkeyPatch, bundle: Path, tmp_path: Path,
              trt: types.ModuleType) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr("segclip.export.tensorrt_build.gpu_facts",
                        lambda: {"gpu": "Stand-in GPU", "compute_capability": "9.0"})
    return target


@pytest.mark.parametrize("with_fp16_flag, typed_flag", [(True, True), (False, True),
                                                        (False, False)],
                         ids=["trt10", "trt11", "trt11-no-typed-flag"])
def test_build_sequence_with_stand_in_tensorrt(bundle: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               with_fp16_flag: bool, typed_flag: bool) -> None:
    calls: list[tuple] = []
    target = _stand_in(monkeypatch, bundle, tmp_path,
                       _fake_tensorrt(calls, with_fp16_flag, typed_flag))
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
    else:  # TRT 11: strongly typed from the fp16 graph (the flag where it still exists)
        assert parsed == [("parse", contract.IMAGE_FP16_ONNX, (1 << 5) if typed_flag else 0),
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


@pytest.mark.parametrize("failure, message", [
    ({"build_fails": True}, r"TensorRT failed to build an engine from image\.onnx"),
    ({"parse_errors": ("In node 3 (Gather): UNSUPPORTED_NODE:\nno int64", "second")},
     r"cannot parse image\.onnx: In node 3 \(Gather\): UNSUPPORTED_NODE: no int64 \| second"),
    ({"profile_rejected": True}, r"rejected the optimisation profile image 1:4:16"),
], ids=["build-returns-None", "parse-returns-False", "profile-index--1"])
def test_tensorrt_failures_are_engine_build_errors(bundle: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   failure: dict[str, Any], message: str) -> None:
    calls: list[tuple] = []
    target = _stand_in(monkeypatch, bundle, tmp_path, _fake_tensorrt(calls, True, **failure))
    before = (target / contract.MANIFEST_FILE).read_bytes()
    with pytest.raises(EngineBuildError, match=message):
        build_engines(target)
    assert not (target / contract.IMAGE_PLAN).exists()
    assert (target / contract.MANIFEST_FILE).read_bytes() == before


def test_foreign_timing_cache_is_refused_before_building(bundle: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """set_timing_cache returns False for a cache from another GPU; nothing is built and the
    user's cache file is left as it was."""
    calls: list[tuple] = []
    target = _stand_in(monkeypatch, bundle, tmp_path, _fake_tensorrt(calls, True))
    cache = tmp_path / "timing.cache"
    cache.write_bytes(FOREIGN_CACHE)
    with pytest.raises(EngineBuildError, match=r"refused the timing cache .*timing\.cache.*"
                                               r"delete it or pass another --timing-cache"):
        build_engines(target, timing_cache=cache)
    assert not [c for c in calls if c[0] == "build"]
    assert cache.read_bytes() == FOREIGN_CACHE


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
