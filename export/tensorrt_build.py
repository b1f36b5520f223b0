"""TensorRT engines for a bundle (docs/architecture.md "Bundle contract": image.plan, text.plan,
one manifest
entry per engine; docs/runtime-practice.md "TensorRT 10.x").

Written against the TensorRT 10 Python API: `create_network(0)` (explicit batch is implicit),
`OnnxParser.parse_from_file` with every parser error listed, one `IOptimizationProfile` per
engine (image batch, text label count), `set_memory_pool_limit(WORKSPACE)`, a timing cache
created/loaded/saved, `build_serialized_network`, atomic plan writes. fp16: `BuilderFlag.FP16`
with norms/softmax/reductions pinned to float32 where the flag exists (TensorRT 10); TensorRT 11
has no such flag, so the image engine is built as a strongly typed network from the bundle's
`image.fp16.onnx`, whose types already say which ops run in fp16. The text engine stays fp32
(it runs once per label set and is cached). `tensorrt` is imported only inside this module's
functions.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segclip.errors import MissingDependencyError
from segclip.export._files import atomic_write_bytes, atomic_write_json
from segclip.export.errors import EngineBuildError, ExportError
from segclip.export.manifest import read_manifest
from segclip.runtime import contract

GPU_INSTALL = "pip install 'segclip[gpu]'"
DEFAULT_BATCH = (1, 4, 16)  # image windows per call
DEFAULT_LABELS = (1, 32, 256)  # label prompts per call
DEFAULT_WORKSPACE_GIB = 4.0


@dataclass(frozen=True)
class Profile:
    """An optimisation-profile range over the dynamic leading dimension."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str, option: str = "--batch") -> Profile:
        """`"MIN:OPT:MAX"` with 1 <= MIN <= OPT <= MAX."""
        parts = text.split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
            raise ExportError(f"{option} must be MIN:OPT:MAX integers with 1 <= MIN <= OPT <= MAX, "
                              f"got {text!r}")
        return cls(*values)

    def shapes(self, tail: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return tuple((n, *tail) for n in (self.min, self.opt, self.max))


def import_tensorrt() -> Any:
    """`tensorrt`, or a MissingDependencyError naming the install command."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingDependencyError(
            f"TensorRT is not installed (import tensorrt failed: {e}); on a machine with an "
            f"NVIDIA GPU install it with {GPU_INSTALL}") from e
    return trt


def gpu_facts() -> dict[str, str]:
    """Name and compute capability of CUDA device 0, or an error if there is no GPU."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - segclip.export needs torch
        raise MissingDependencyError(f"reading the GPU needs torch: {e}") from e
    if not torch.cuda.is_available():
        raise MissingDependencyError(
            f"no CUDA GPU is visible (torch.cuda.is_available() is False); TensorRT engines are "
            f"built on the GPU that will run them: run this on that machine with {GPU_INSTALL}")
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_onnx(trt: Any, builder: Any, logger: Any, onnx_path: Path, strongly_typed: bool,
                ) -> Any:
    flags = 0
    # TensorRT 11 deprecates STRONGLY_TYPED (every network is strongly typed, the flag is
    # ignored): use it where it still exists, else the default network is already typed.
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed and typed_flag is not None:
        flags = 1 << int(typed_flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: "
                               + " | ".join(e.replace("\n", " ") for e in errors))
    return network, parser


def _keep_float32(trt: Any, network: Any) -> int:
    """Pin normalisation, softmax and reduction layers to float32 in a weakly typed fp16 build
    (docs/runtime-practice.md pitfall 2); returns how many layers were pinned."""
    kinds = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in kinds and layer.get_output(0).dtype == trt.float32:
            layer.precision = trt.float32
            for out in range(layer.num_outputs):
                layer.set_output_type(out, trt.float32)
            pinned += 1
    return pinned


def _attach_timing_cache(config: Any, path: Path) -> Any:
    """Load `path` (empty if absent) into a timing cache and attach it to `config`.

    `set_timing_cache` reports a cache from another GPU/TensorRT by returning False (nothing is
    attached, and `get_timing_cache()` is then None), not by raising: refuse it before the build.
    """
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    # ignore_mismatch=False: a cache recorded on another device is refused, not used
    if cache is None or not config.set_timing_cache(cache, False):
        raise EngineBuildError(f"TensorRT refused the timing cache {path} (written by another "
                               f"TensorRT version or GPU, or damaged); delete it or pass another "
                               f"--timing-cache path")
    return cache


def build_engine(trt: Any, onnx_path: Path, plan_path: Path, input_name: str,
                 profile: Profile, tail: tuple[int, ...], fp16: bool, workspace_gib: float,
                 timing_cache: Path | None) -> dict[str, Any]:
    """Parse `onnx_path`, build with one optimisation profile on `input_name`, write the plan
    atomically; returns the facts recorded in the manifest."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    weak_fp16 = fp16 and hasattr(trt.BuilderFlag, "FP16")
    strongly_typed = fp16 and not weak_fp16  # TensorRT 11: precision comes from the graph
    network, _parser = _parse_onnx(trt, builder, logger, onnx_path, strongly_typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(input_name, *profile.shapes(tail))
    if config.add_optimization_profile(opt_profile) < 0:  # -1, not an exception, when invalid
        raise EngineBuildError(f"TensorRT rejected the optimisation profile {input_name} "
                               f"{profile.min}:{profile.opt}:{profile.max} x {tail} for "
                               f"{onnx_path.name}: the graph's input {input_name!r} does not take "
                               f"that shape; re-export the bundle or pass another profile")
    if weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        if _keep_float32(trt, network):
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    cache = _attach_timing_cache(config, timing_cache) if timing_cache is not None else None
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path.name} (see "
                               f"the TensorRT log above); try a larger --workspace or a "
                               f"narrower profile")
    seconds = time.perf_counter() - start
    atomic_write_bytes(plan_path, memoryview(serialized))
    if cache is not None and timing_cache is not None:  # the attached cache, grown by the build
        atomic_write_bytes(timing_cache, memoryview(cache.serialize()))
    io = {network.get_input(i).name: str(network.get_input(i).dtype).split(".")[-1]
          for i in range(network.num_inputs)}
    io.update({network.get_output(i).name: str(network.get_output(i).dtype).split(".")[-1]
               for i in range(network.num_outputs)})
    return {"file": plan_path.name, "onnx": onnx_path.name, "onnx_sha256": _sha256(onnx_path),
            "precision": "fp16" if fp16 else "fp32",
            "typing": "strong" if strongly_typed else "weak", "tensorrt": trt.__version__,
            "profile": {"input": input_name, "min": profile.min, "opt": profile.opt,
                        "max": profile.max},
            "io_dtypes": io, "workspace_gib": workspace_gib,
            "build_seconds": round(seconds, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def build_engines(bundle_dir: str | Path, fp16: bool = False,
                  batch: Profile = Profile(*DEFAULT_BATCH),
                  labels: Profile = Profile(*DEFAULT_LABELS),
                  workspace_gib: float = DEFAULT_WORKSPACE_GIB,
                  timing_cache: str | Path | None = None,
                  progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Build `image.plan` and `text.plan` in `bundle_dir` and record them in `segclip.json`.

    Args:
        fp16: image engine in fp16 (text stays fp32).
        batch / labels: profile ranges of the image batch and the text label count.
        timing_cache: file to load (if present) and save TensorRT's timing cache to.
    Returns:
        The manifest's engine entries (tower, precision, TensorRT version, GPU, profile, ...).
    Raises:
        MissingDependencyError: no TensorRT or no GPU (message gives the install command).
        EngineBuildError: parsing or building failed.
    """
    say = progress or (lambda _: None)
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if workspace_gib <= 0:
        raise ExportError(f"--workspace must be > 0 GiB, got {workspace_gib}")
    trt = import_tensorrt()
    gpu = gpu_facts()
    files, size = manifest["files"], manifest["model"]["image_size"]
    image_onnx = files["image"]
    if fp16 and not hasattr(trt.BuilderFlag, "FP16"):
        if "image_fp16" not in files:
            raise ExportError(f"TensorRT {trt.__version__} builds fp16 only from a typed graph; "
                              f"{bundle_dir} has no {contract.IMAGE_FP16_ONNX}: re-export with "
                              f"segclip-export onnx CKPT --fp16 --out {bundle_dir}")
        image_onnx = files["image_fp16"]
    cache = Path(timing_cache) if timing_cache is not None else None
    jobs = [("image", image_onnx, contract.IMAGE_PLAN, contract.IMAGE_INPUT, batch,
             (3, size, size), fp16),
            ("text", files["text"], contract.TEXT_PLAN, contract.TEXT_INPUT, labels,
             (manifest["model"]["context_length"],), False)]
    entries = []
    for tower, onnx_name, plan, input_name, profile, tail, half in jobs:
        say(f"building {plan} from {onnx_name} ({'fp16' if half else 'fp32'}, {input_name} "
            f"{profile.min}:{profile.opt}:{profile.max}) on {gpu['gpu']} -- this takes minutes")
        entry = build_engine(trt, bundle_dir / onnx_name, bundle_dir / plan, input_name, profile,
                             tail, half, workspace_gib, cache)
        entries.append({"tower": tower, **entry, **gpu})
    engines = [e for e in manifest.get("engines", []) if e.get("tower") not in {"image", "text"}]
    manifest["engines"] = engines + entries
    atomic_write_json(bundle_dir / contract.MANIFEST_FILE, manifest)
    return entries
