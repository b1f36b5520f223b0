"""The bundle reader (docs/architecture.md "Bundle contract"): `segclip.json` checked against its
files.

`Bundle.open(path)` takes a bundle directory, or a path to one of its engines (`image.onnx`,
`image.fp16.onnx`, `image.int8.onnx`, `image.ov-int8.xml`, `image.plan`: the file then also says
which engine to run) or to `segclip.json`. It checks the manifest's format and version, the model
facts and preprocessing the runtime relies on, and that every listed file is present with its
recorded size. Checks that need a loaded graph run where the graph is loaded: every backend passes
the graph's or engine's I/O metadata to `Bundle.check_io`, and the TensorRT backend passes the
TensorRT version and GPU it found to `Bundle.check_engine`, which refuses an engine built for
another one (docs/runtime-practice.md pitfall 1). Every error is a `BundleError` (or `EngineError`)
naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segclip.runtime import contract
from segclip.runtime.errors import BundleError, EngineError

# image graph precision -> manifest "files" key (export/bundle.py IMAGE_VARIANTS)
IMAGE_VARIANT_KEYS = {"fp32": "image", "fp16": "image_fp16", "int8": "image_int8"}
_ENGINE_FILES = {contract.IMAGE_ONNX: ("onnx", "fp32"), contract.IMAGE_FP16_ONNX: ("onnx", "fp16"),
                 contract.IMAGE_INT8_ONNX: ("onnx", "int8"),
                 "image.ov-int8.xml": ("openvino", "ov-int8"),  # runtime/variants.py OV_INT8_XML
                 contract.IMAGE_PLAN: ("tensorrt", None)}
MAX_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class EngineFacts:
    """The TensorRT version and GPU present on this machine (compared with an engine's)."""

    tensorrt: str
    gpu: str
    compute_capability: str  # "major.minor"


@dataclass(frozen=True)
class EngineInfo:
    """One TensorRT engine entry of the manifest (export/tensorrt_build.py `build_engine`)."""

    tower: str  # "image" or "text"
    path: Path
    tensorrt: str
    gpu: str
    compute_capability: str
    precision: str
    profile: tuple[int, int, int]  # (min, opt, max) of the dynamic leading dimension
    io_dtypes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DenseFacts:
    """The protocol of a dense bundle (docs/dense.md): windows, resize and decision defaults."""

    mode: str  # naclip | sclip | clearclip | maskclip | scclip
    window: int  # S, the graph's input side
    stride: int  # between windows
    short_side: int  # the image's short side before the windows (336 for S = 224)
    logit_scale: float  # multiplies the cosine similarities before the softmax
    prob_thd: float  # background below this winning probability
    area_thd: float  # classes covering at most this fraction of the labelled pixels are dropped


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (int, or str/None/-1 for a dynamic dimension) and dtype of a graph tensor."""

    name: str
    shape: tuple[Any, ...]
    dtype: str  # numpy name: "float32", "int64", ...


def rebuild_command(root: Path, precision: str = "fp32") -> str:
    return f"segclip-export trt {root}{' --fp16' if precision == 'fp16' else ''}"


def reexport_command(root: Path) -> str:
    return f"segclip-export onnx CKPT --out {root}"


def _locate(path: Path) -> tuple[Path, str | None, str | None]:
    """(bundle directory, requested engine kind, requested image variant) of a user path."""
    if not path.exists():
        known = _ENGINE_FILES.get(path.name)
        if known is not None and (path.parent / contract.MANIFEST_FILE).is_file():
            kind, variant = known
            fix = {"tensorrt": f"build it with {rebuild_command(path.parent)}",
                   "openvino": f"add it with segclip-export openvino {path.parent} CKPT --int8"
                   }.get(kind, f"re-export with {reexport_command(path.parent)} --{variant}")
            raise BundleError(f"the bundle {path.parent} has no {variant or kind} graph "
                              f"({path.name}); {fix}, or pass the bundle folder")
        raise BundleError(f"bundle path {path} does not exist; pass a bundle directory (or its "
                          f"image.onnx / image.plan) made by segclip-export onnx CKPT --out DIR")
    if path.is_dir():
        return path, None, None
    if path.name == contract.MANIFEST_FILE:
        return path.parent, None, None
    if path.name in _ENGINE_FILES:
        kind, variant = _ENGINE_FILES[path.name]
        return path.parent, kind, variant
    raise BundleError(
        f"{path} is not a segclip bundle: pass the bundle directory, or its "
        f"{', '.join(_ENGINE_FILES)} (got a file named {path.name!r})")


def _read_manifest(root: Path) -> tuple[dict[str, Any], str]:
    path = root / contract.MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{root} is not a segclip bundle: it has no {contract.MANIFEST_FILE}; "
                          f"create one with {reexport_command(root)}")
    try:
        data = path.read_bytes()
        manifest = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {path}: {e}; the bundle is damaged, re-export it with "
                          f"{reexport_command(root)}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != contract.BUNDLE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{path} is not a segclip bundle manifest: format {found!r}, expected "
                          f"{contract.BUNDLE_FORMAT!r}; create a bundle with "
                          f"{reexport_command(root)}")
    version = manifest.get("version")
    if version != contract.BUNDLE_VERSION:
        newer = isinstance(version, int) and version > contract.BUNDLE_VERSION
        fix = ("upgrade segclip, or re-export with this one: " if newer else "re-export it: ")
        raise BundleError(f"{path}: bundle version {version!r} is not supported by this segclip "
                          f"(it reads version {contract.BUNDLE_VERSION}); {fix}"
                          f"{reexport_command(root)}")
    return manifest, hashlib.sha256(data).hexdigest()


def _section(manifest: Mapping[str, Any], name: str, path: Path, required: bool = True,
             ) -> Mapping[str, Any]:
    value = manifest.get(name)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise BundleError(f"{path}: section {name!r} is missing or not an object; re-export the "
                          f"bundle with {reexport_command(path.parent)}")
    return value


def _positive_int(section: Mapping[str, Any], key: str, where: str, path: Path) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BundleError(f"{path}: {where}.{key} must be a positive integer, got {value!r}; "
                          f"re-export with {reexport_command(path.parent)}")
    return value


def _number(section: Mapping[str, Any], key: str, where: str, path: Path, low: float,
            high: float, default: float | None = None) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and low <= value <= high):
        raise BundleError(f"{path}: {where}.{key} must be a number in [{low}, {high}], got "
                          f"{value!r}; re-export with {reexport_command(path.parent)}")
    return float(value)


def _triple(section: Mapping[str, Any], key: str, default: Sequence[float], path: Path,
            ) -> tuple[float, float, float]:
    value = section.get(key, list(default))
    if (not isinstance(value, list) or len(value) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise BundleError(f"{path}: preprocessing.{key} must be 3 numbers (RGB), got {value!r}; "
                          f"re-export with {reexport_command(path.parent)}")
    if key == "std" and min(value) <= 0:
        raise BundleError(f"{path}: preprocessing.std must be positive, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def _check_file(root: Path, name: Any, key: str, sizes: Mapping[str, Any]) -> Path:
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise BundleError(f"{root / contract.MANIFEST_FILE}: files.{key} must be a plain file "
                          f"name inside the bundle, got {name!r}; re-export with "
                          f"{reexport_command(root)}")
    path = root / name
    if not path.is_file():
        raise BundleError(f"{path} is missing (listed as files.{key} in "
                          f"{contract.MANIFEST_FILE}); the bundle is incomplete: re-export it "
                          f"with {reexport_command(root)}")
    recorded = sizes.get(name)
    if isinstance(recorded, int) and recorded != path.stat().st_size:
        raise BundleError(f"{path} is {path.stat().st_size} bytes but {contract.MANIFEST_FILE} "
                          f"records {recorded}: the file is truncated or was replaced; re-export "
                          f"with {reexport_command(root)}")
    return path


def _engine_entry(root: Path, entry: Any) -> EngineInfo:
    where = f"{root / contract.MANIFEST_FILE}: engine entry {entry!r}"
    if not isinstance(entry, dict) or entry.get("tower") not in ("image", "text"):
        raise BundleError(f"{where} is not an image/text engine; rebuild the engines with "
                          f"{rebuild_command(root)}")
    name = entry.get("file")
    if not isinstance(name, str) or Path(name).name != name:
        raise BundleError(f"{where} has no plain 'file' name; rebuild with {rebuild_command(root)}")
    profile = entry.get("profile") or {}
    try:
        low, opt, high = (int(profile[k]) for k in ("min", "opt", "max"))
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{where} lacks its batch profile min/opt/max; rebuild with "
                          f"{rebuild_command(root)}") from e
    precision = str(entry.get("precision", "fp32"))
    return EngineInfo(tower=entry["tower"], path=root / name,
                      tensorrt=str(entry.get("tensorrt", "?")), gpu=str(entry.get("gpu", "?")),
                      compute_capability=str(entry.get("compute_capability", "?")),
                      precision=precision, profile=(low, opt, high),
                      io_dtypes=dict(entry.get("io_dtypes") or {}))


def _model_facts(model: Mapping[str, Any], path: Path) -> dict[str, Any]:
    facts: dict[str, Any] = {k: _positive_int(model, k, "model", path) for k in (
        "image_size", "patch_size", "num_centers", "embed_dim", "context_length")}
    if facts["image_size"] % facts["patch_size"]:
        raise BundleError(f"{path}: model.image_size {facts['image_size']} is not a multiple of "
                          f"model.patch_size {facts['patch_size']}; re-export with "
                          f"{reexport_command(path.parent)}")
    if facts["context_length"] < 2:
        raise BundleError(f"{path}: model.context_length must be >= 2, got "
                          f"{facts['context_length']}")
    facts["logit_scale"] = _number(model, "logit_scale", "model", path, 1e-6, MAX_LOGIT_SCALE)
    return facts


def _inference(infer: Mapping[str, Any], path: Path) -> tuple[str, int, float]:
    """(template, top_k, threshold) with the contract's defaults for missing keys."""
    template = infer.get("template", contract.DEFAULT_TEMPLATE)
    if not isinstance(template, str) or template.count("{}") != 1:
        raise BundleError(f"{path}: inference.template must be a string with one {{}} "
                          f"placeholder, got {template!r}")
    top_k = infer.get("top_k", contract.DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise BundleError(f"{path}: inference.top_k must be an integer >= 1, got {top_k!r}")
    threshold = _number(infer, "threshold", "inference", path, 0.0, 1.0,
                        contract.DEFAULT_THRESHOLD)
    return template, top_k, threshold


def _files(root: Path, manifest: Mapping[str, Any]) -> dict[str, Path]:
    """Every listed file, present with its recorded size; image, text, tokenizer required."""
    path = root / contract.MANIFEST_FILE
    files = _section(manifest, "files", path)
    for key in ("image", "text", "tokenizer"):
        if key not in files:
            raise BundleError(f"{path}: files.{key} is missing; re-export with "
                              f"{reexport_command(root)}")
    sizes = manifest.get("file_bytes") if isinstance(manifest.get("file_bytes"), dict) else {}
    return {key: _check_file(root, name, key, sizes) for key, name in files.items()}


def _engines(root: Path, manifest: Mapping[str, Any]) -> dict[str, EngineInfo]:
    raw = manifest.get("engines") or []
    if not isinstance(raw, list):
        raise BundleError(f"{root / contract.MANIFEST_FILE}: 'engines' must be a list; rebuild "
                          f"with {rebuild_command(root)}")
    engines = {}
    for entry in raw:
        info = _engine_entry(root, entry)
        engines[info.tower] = info
    return engines


@dataclass(frozen=True)
class Bundle:
    """A validated bundle directory: model facts, preprocessing, defaults, files, engines."""

    root: Path
    manifest: dict[str, Any] = field(repr=False)
    manifest_sha256: str
    image_size: int  # S: window side and short-side resize target
    patch_size: int
    grid_size: int  # h = w = S / patch_size
    num_centers: int  # L
    embed_dim: int  # D
    context_length: int  # C
    logit_scale: float  # the multiplier itself (exp of the parameter, <= 100)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    template: str
    top_k: int
    threshold: float
    files: dict[str, Path]  # manifest "files" key -> path
    engines: dict[str, EngineInfo]  # tower -> TensorRT engine
    requested_engine: str | None = None  # "onnx" / "tensorrt" when opened through that file
    requested_variant: str | None = None  # "fp32" / "fp16" / "int8" / "ov-int8" when opened
    # through that file
    kind: str = "segclip"  # or contract.DENSE_KIND: a training-free dense CLIP (docs/dense.md)
    dense: DenseFacts | None = None  # the dense protocol, for kind "dense"

    @classmethod
    def open(cls, path: str | os.PathLike | Bundle) -> Bundle:
        """Read and check the bundle at `path` (a directory, an engine file or segclip.json)."""
        if isinstance(path, Bundle):
            return path
        root, requested, variant = _locate(Path(path))
        manifest, sha = _read_manifest(root)
        manifest_path = root / contract.MANIFEST_FILE
        kind = manifest.get("kind", "segclip")  # absent: a SegCLIP bundle
        if kind == contract.DENSE_KIND:
            return cls._open_dense(root, manifest, sha, requested, variant)
        if kind != "segclip":
            raise BundleError(f"{manifest_path}: unknown bundle kind {kind!r} (this segclip "
                              f"reads 'segclip' and 'dense' bundles); upgrade segclip or "
                              f"re-export the bundle")
        facts = _model_facts(_section(manifest, "model", manifest_path), manifest_path)
        size = facts["image_size"]
        prep = _section(manifest, "preprocessing", manifest_path, required=False)
        for key in ("window", "stride", "resize_short_side"):
            if prep.get(key, size) != size:
                raise BundleError(
                    f"{manifest_path}: preprocessing.{key} is {prep.get(key)!r}, but this runtime "
                    f"slides windows of image_size {size} with stride {size} on a short side of "
                    f"{size}; re-export with {reexport_command(root)}")
        template, top_k, threshold = _inference(
            _section(manifest, "inference", manifest_path, required=False), manifest_path)
        bundle = cls(root=root, manifest=manifest, manifest_sha256=sha, image_size=size,
                     patch_size=facts["patch_size"], grid_size=size // facts["patch_size"],
                     num_centers=facts["num_centers"], embed_dim=facts["embed_dim"],
                     context_length=facts["context_length"], logit_scale=facts["logit_scale"],
                     mean=_triple(prep, "mean", contract.CLIP_MEAN, manifest_path),
                     std=_triple(prep, "std", contract.CLIP_STD, manifest_path),
                     template=template, top_k=top_k, threshold=threshold,
                     files=_files(root, manifest), engines=_engines(root, manifest),
                     requested_engine=requested, requested_variant=variant)
        if requested == "tensorrt":
            bundle.engine("image")  # the plan the user named must be a recorded engine
        return bundle

    @classmethod
    def _open_dense(cls, root: Path, manifest: dict[str, Any], sha: str,
                    requested: str | None, variant: str | None) -> Bundle:
        """A bundle of kind "dense" (export/dense.py): its model facts and protocol."""
        path = root / contract.MANIFEST_FILE
        model = _section(manifest, "model", path)
        facts = {k: _positive_int(model, k, "model", path) for k in (
            "image_size", "patch_size", "embed_dim", "context_length")}
        size = facts["image_size"]
        if size % facts["patch_size"]:
            raise BundleError(f"{path}: model.image_size {size} is not a multiple of "
                              f"model.patch_size {facts['patch_size']}")
        prep = _section(manifest, "preprocessing", path)
        protocol = _section(manifest, "protocol", path)
        window = _positive_int(prep, "window", "preprocessing", path)
        if window != size:
            raise BundleError(f"{path}: preprocessing.window {window} differs from "
                              f"model.image_size {size}")
        mode = manifest.get("mode")
        if not isinstance(mode, str) or not mode:
            raise BundleError(f"{path}: a dense bundle names its 'mode' (naclip, sclip, ...)")
        dense = DenseFacts(
            mode=mode, window=window,
            stride=_positive_int(prep, "stride", "preprocessing", path),
            short_side=_positive_int(prep, "resize_short_side", "preprocessing", path),
            logit_scale=_number(protocol, "logit_scale", "protocol", path, 1e-6,
                                MAX_LOGIT_SCALE),
            prob_thd=_number(protocol, "prob_thd", "protocol", path, 0.0, 1.0, 0.0),
            area_thd=_number(protocol, "area_thd", "protocol", path, 0.0, 1.0, 0.0))
        if requested == "tensorrt" or variant == "ov-int8":
            raise BundleError(f"{root} is a dense bundle: it runs on ONNX Runtime (image.onnx, "
                              f"image.fp16.onnx, image.int8.onnx), not {variant or requested}")
        return cls(root=root, manifest=manifest, manifest_sha256=sha, image_size=size,
                   patch_size=facts["patch_size"], grid_size=size // facts["patch_size"],
                   num_centers=0, embed_dim=facts["embed_dim"],
                   context_length=facts["context_length"], logit_scale=dense.logit_scale,
                   mean=_triple(prep, "mean", contract.CLIP_MEAN, path),
                   std=_triple(prep, "std", contract.CLIP_STD, path),
                   template="{}", top_k=1, threshold=dense.prob_thd,
                   files=_files(root, manifest), engines={}, requested_engine=requested,
                   requested_variant=variant, kind=contract.DENSE_KIND, dense=dense)

    @property
    def tokenizer_path(self) -> Path:
        return self.files["tokenizer"]

    def image_onnx(self, variant: str = "fp32") -> Path:
        """Path of the image graph of `variant` (fp32 image.onnx, fp16, int8)."""
        if variant not in IMAGE_VARIANT_KEYS:
            raise BundleError(f"unknown image variant {variant!r}; choose one of "
                              f"{sorted(IMAGE_VARIANT_KEYS)}")
        key = IMAGE_VARIANT_KEYS[variant]
        if key not in self.files:
            flag = {"fp16": " --fp16", "int8": " --int8"}.get(variant, "")
            raise BundleError(f"{self.root} has no {variant} image graph (files.{key} is not in "
                              f"{contract.MANIFEST_FILE}); re-export with segclip-export onnx "
                              f"CKPT{flag} --out {self.root}")
        return self.files[key]

    def engine(self, tower: str) -> EngineInfo:
        """The TensorRT engine entry of `tower`, present on disk."""
        info = self.engines.get(tower)
        if info is None:
            raise BundleError(f"{self.root} has no TensorRT {tower} engine recorded in "
                              f"{contract.MANIFEST_FILE}; build one with "
                              f"{rebuild_command(self.root)}")
        if not info.path.is_file():
            raise BundleError(f"{info.path} is missing (recorded as the {tower} engine in "
                              f"{contract.MANIFEST_FILE}); rebuild with "
                              f"{rebuild_command(self.root, info.precision)}")
        return info

    def check_engine(self, tower: str, present: EngineFacts) -> EngineInfo:
        """Refuse an engine built with another TensorRT version or on another GPU."""
        info = self.engine(tower)
        differs = []
        if info.tensorrt != present.tensorrt:
            differs.append(f"TensorRT {info.tensorrt} (this machine: {present.tensorrt})")
        if info.gpu != present.gpu:
            differs.append(f"GPU {info.gpu!r} (this machine: {present.gpu!r})")
        if info.compute_capability != present.compute_capability:
            differs.append(f"compute capability {info.compute_capability} (this machine: "
                           f"{present.compute_capability})")
        if differs:
            raise EngineError(
                f"{info.path} was built for {'; '.join(differs)}: TensorRT engines run only on "
                f"the TensorRT version and GPU that built them. Rebuild on this machine with "
                f"{rebuild_command(self.root, info.precision)}, or run the ONNX graph instead "
                f"(pass {self.root / contract.IMAGE_ONNX})")
        return info

    def check_io(self, source: str, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec]) -> None:
        """Check a loaded graph/engine's I/O against the contract and the manifest's facts.

        Args:
            source: the file the tensors come from ("image.onnx", "text.plan", ...); its tower is
                read from its name.
        """
        tower = "text" if source.startswith("text") else "image"
        size, grid = self.image_size, self.grid_size
        centers, dim = self.num_centers, self.embed_dim
        if tower == "image" and self.kind == contract.DENSE_KIND:
            want_in = {contract.IMAGE_INPUT: ((None, 3, size, size), ("float32",))}
            want_out = {contract.PATCH_OUTPUT: ((None, grid * grid, dim), ("float32",))}
        elif tower == "image":
            want_in = {contract.IMAGE_INPUT: ((None, 3, size, size), ("float32",))}
            want_out = {contract.GLOBAL_OUTPUT: ((None, dim), ("float32",)),
                        contract.REGIONS_OUTPUT: ((None, centers, dim), ("float32",)),
                        contract.ASSIGN_OUTPUT: ((None, centers, grid, grid), ("float32",))}
        else:
            want_in = {contract.TEXT_INPUT: ((None, self.context_length), ("int64", "int32"))}
            want_out = {contract.TEXT_OUTPUT: ((None, dim), ("float32",))}
        for kind, specs, wanted in (("input", inputs, want_in), ("output", outputs, want_out)):
            found = {spec.name: spec for spec in specs}
            for name, (shape, dtypes) in wanted.items():
                self._check_tensor(source, kind, found.get(name), name, shape, dtypes,
                                   sorted(found))

    def _check_tensor(self, source: str, kind: str, spec: TensorSpec | None, name: str,
                      shape: tuple[int | None, ...], dtypes: tuple[str, ...],
                      names: list[str]) -> None:
        fix = (f"the graph and {contract.MANIFEST_FILE} disagree; re-export with "
               f"{reexport_command(self.root)}")
        if source.endswith(".plan"):
            fix = f"the engine and {contract.MANIFEST_FILE} disagree; rebuild with " \
                  f"{rebuild_command(self.root)}"
        if spec is None:
            raise BundleError(f"{self.root / source} has no {kind} {name!r} (its {kind}s: "
                              f"{names}); {fix}")
        expected = "[" + ", ".join("N" if s is None else str(s) for s in shape) + "]"
        got = "[" + ", ".join(str(s) for s in spec.shape) + "]"
        if len(spec.shape) != len(shape) or any(
                want is not None and isinstance(have, int) and have >= 0 and have != want
                for want, have in zip(shape, spec.shape)):
            raise BundleError(f"{self.root / source}: {kind} {name!r} has shape {got}, but "
                              f"{contract.MANIFEST_FILE} implies {expected} (image_size "
                              f"{self.image_size}, patch_size {self.patch_size}, num_centers "
                              f"{self.num_centers}, embed_dim {self.embed_dim}, context_length "
                              f"{self.context_length}); {fix}")
        if spec.dtype not in dtypes:
            raise BundleError(f"{self.root / source}: {kind} {name!r} is {spec.dtype}, expected "
                              f"{' or '.join(dtypes)}; {fix}")

    def verify_graphs(self) -> None:
        """Load every ONNX graph on CPU (no optimisation) and `check_io` it: a full check."""
        from segclip.runtime.backends.onnxruntime import graph_specs

        for key, path in self.files.items():
            if path.suffix == ".onnx":
                inputs, outputs = graph_specs(path)
                self.check_io(path.name, inputs, outputs)
