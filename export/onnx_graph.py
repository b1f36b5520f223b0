"""ONNX export of the two towers and the graph checks every exported file passes
(docs/architecture.md
"Bundle contract"; docs/runtime-practice.md "ONNX export of ViTs").

The exporter is pinned: `torch.onnx.export(..., dynamo=False)`, the TorchScript exporter, whose
`dynamic_axes` give the dynamic batch / label count and which supports opsets 17..20 (17 is the
first with `LayerNormalization`, which TensorRT maps to INormalizationLayer). The traced example
batch is 2, never 1, so no size-1 specialisation can be frozen into the graph; the image side S is
static, and the patch grid comes from the conv output shape.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from segclip.export.blocks import lean_blocks
from segclip.export.errors import ExportError
from segclip.export.wrappers import ImageEncoderOnnx, TextEncoderOnnx
from segclip.model import SegCLIP
from segclip.runtime import contract

MIN_OPSET = 17  # LayerNormalization
MAX_OPSET = 20  # the TorchScript exporter's cap in torch >= 2.9
EXPORTER = "torch.onnx.export(dynamo=False) (TorchScript)"
# ops that break the contract (non-deterministic, scatter/one-hot, control flow from scripting)
FORBIDDEN_OPS = frozenset({
    "Scatter", "ScatterElements", "ScatterND", "OneHot", "RandomNormal", "RandomNormalLike",
    "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "If", "Loop", "Scan",
})
BATCH_DIM = contract.BATCH_DIM
LABELS_DIM = contract.LABELS_DIM
EXAMPLE_BATCH = 2


@dataclass(frozen=True)
class TensorSpec:
    """Expected graph I/O: name, ONNX element type, dims (str = symbolic, int = fixed)."""

    name: str
    elem_type: int
    dims: tuple[str | int, ...]


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be in [{MIN_OPSET}, {MAX_OPSET}] for the TorchScript "
                          f"exporter (17 adds LayerNormalization), got {opset}")
    return opset


def image_specs(model: SegCLIP) -> tuple[list[TensorSpec], list[TensorSpec]]:
    c = model.config
    f32 = onnx.TensorProto.FLOAT
    inputs = [TensorSpec(contract.IMAGE_INPUT, f32, (BATCH_DIM, 3, c.image_size, c.image_size))]
    outputs = [TensorSpec(contract.GLOBAL_OUTPUT, f32, (BATCH_DIM, c.embed_dim)),
               TensorSpec(contract.REGIONS_OUTPUT, f32, (BATCH_DIM, c.num_centers, c.embed_dim)),
               TensorSpec(contract.ASSIGN_OUTPUT, f32,
                          (BATCH_DIM, c.num_centers, c.grid_size, c.grid_size))]
    return inputs, outputs


def text_specs(model: SegCLIP) -> tuple[list[TensorSpec], list[TensorSpec]]:
    c = model.config
    inputs = [TensorSpec(contract.TEXT_INPUT, onnx.TensorProto.INT64,
                         (LABELS_DIM, c.context_length))]
    outputs = [TensorSpec(contract.TEXT_OUTPUT, onnx.TensorProto.FLOAT,
                          (LABELS_DIM, c.embed_dim))]
    return inputs, outputs


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, opset: int,
            inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    dynamic_axes = {spec.name: {i: d for i, d in enumerate(spec.dims) if isinstance(d, str)}
                    for spec in (*inputs, *outputs)}
    with warnings.catch_warnings():
        # the one expected tracer warning: `patch_positions` compares the grid with the trained
        # grid in Python; S is static in the bundle, so that branch is rightly fixed
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # text tower: x[arange(T), argmax] -- the indices are never negative
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        with torch.no_grad(), _mha_fastpath(False):
            torch.onnx.export(module, (example,), str(path), dynamo=False,
                              input_names=[s.name for s in inputs],
                              output_names=[s.name for s in outputs],
                              dynamic_axes=dynamic_axes, opset_version=opset,
                              do_constant_folding=True)
    _declare_shapes(path, outputs)


def _declare_shapes(path: Path, specs: list[TensorSpec]) -> None:
    """Write the contract's output shapes into the graph: the exporter leaves static dims it could
    not infer through `F.normalize` as made-up symbols ('Divglobal_dim_1'). The full checker's
    strict shape inference then confirms the declared shapes."""
    model = onnx.load(str(path))
    by_name = {spec.name: spec for spec in specs}
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, by_name[value.name].dims):
            if isinstance(want, int):
                dim.dim_value = want
            else:
                dim.dim_param = want
    onnx.save(model, str(path))


@contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    """Switch nn.MultiheadAttention's fused inference path: under no_grad in eval mode it calls
    `aten::_native_multi_head_attention`, which has no ONNX symbolic."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def export_image_onnx(model: SegCLIP, path: Path, opset: int) -> None:
    """Write the image tower as ONNX (model: eval mode, float32, CPU), its ViT blocks as
    `LeanBlock`s: grid² patch tokens before the group, L region tokens after it."""
    c = model.config
    example = torch.randn(EXAMPLE_BATCH, 3, c.image_size, c.image_size,
                          generator=torch.Generator().manual_seed(0))
    blocks = model.visual.transformer.resblocks
    tokens = [c.grid_size ** 2] * c.group_layer + [c.num_centers] * (len(blocks) - c.group_layer)
    with lean_blocks(blocks, tokens):
        _export(ImageEncoderOnnx(model).eval(), example, path, opset, *image_specs(model))


def export_text_onnx(model: SegCLIP, path: Path, opset: int) -> None:
    """Write the text tower as ONNX (blocks as `LeanBlock`s on C tokens); the example holds EOT
    at different positions."""
    c = model.config
    example = torch.zeros(EXAMPLE_BATCH, c.context_length, dtype=torch.int64)  # (T, C)
    for row, length in enumerate((5, 9)):
        example[row, 0] = c.vocab_size - 2  # SOT
        example[row, 1:length - 1] = torch.arange(400, 400 + length - 2)
        example[row, length - 1] = c.vocab_size - 1  # EOT: the largest id (argmax)
    blocks = model.transformer.resblocks
    with lean_blocks(blocks, [c.context_length] * len(blocks)):
        _export(TextEncoderOnnx(model).eval(), example, path, opset, *text_specs(model))


def _dims(value_info: onnx.ValueInfoProto) -> tuple[str | int, ...]:
    shape = value_info.type.tensor_type.shape
    return tuple(d.dim_param if d.dim_param else d.dim_value for d in shape.dim)


def _check_io(kind: str, found: list[onnx.ValueInfoProto], expected: list[TensorSpec],
              path: Path) -> None:
    got = [(v.name, v.type.tensor_type.elem_type, _dims(v)) for v in found]
    want = [(s.name, s.elem_type, s.dims) for s in expected]
    if got != want:
        raise ExportError(f"{path.name}: graph {kind} {got} differ from the contract {want}")


def check_graph(path: Path, opset: int, inputs: list[TensorSpec],
                outputs: list[TensorSpec]) -> Counter[str]:
    """Full ONNX checker, contract I/O (names, dtypes, symbolic batch), opset, forbidden ops.

    Returns the op-type histogram of the graph.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path.name} fails the ONNX checker: {str(e).splitlines()[0]}") from e
    model = onnx.load(str(path), load_external_data=False)
    versions = {o.domain: o.version for o in model.opset_import}
    if versions.get("", versions.get("ai.onnx")) != opset:
        raise ExportError(f"{path.name}: default-domain opset {versions} is not {opset}")
    graph_inputs = [v for v in model.graph.input
                    if v.name not in {i.name for i in model.graph.initializer}]
    _check_io("inputs", graph_inputs, inputs, path)
    _check_io("outputs", list(model.graph.output), outputs, path)
    ops = Counter(node.op_type for node in model.graph.node)
    bad = sorted(set(ops) & FORBIDDEN_OPS)
    if bad:
        raise ExportError(f"{path.name} contains ops the contract forbids: {bad}")
    return ops
