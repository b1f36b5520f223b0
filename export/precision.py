"""Reduced-precision variants of the image graph (docs/architecture.md "Bundle contract":
image.fp16.onnx;
docs/runtime-practice.md pitfall 2, "FP16 transformer overflow").

- fp16: `onnxruntime.transformers.float16` (no extra dependency) with float32 graph I/O; norms,
  softmaxes, reductions and the hard-assignment comparison stay float32, where fp16 overflows or
  flips ties. It is the input of TensorRT 11's strongly typed fp16 build.
- int8: ONNX Runtime dynamic quantisation of MatMul/Gemm weights (int8, per output channel);
  activations are quantised on the fly (uint8, one scale per tensor, so over the whole batch).
  A CPU variant. Only the ViT blocks on the patch tokens before the semantic group are
  quantised (94 % of the `vit-b16` FLOPs); the group (paper §2.2) and everything after it stay
  float32 (`INT8_KEEP_FLOAT32`), as do activation x activation products. Quantising the group
  flips the patch -> center argmax of near-tied patches (region-argmax agreement with PyTorch on
  `vit-b16` random weights, `nn.MultiheadAttention` trace: 92.95 % with it, 98.65 % without),
  and quantising the blocks after it flips region labels. The trained demo models pass the
  99 % bar (99.95 %; the earlier 2-cross-layer one 99.59 %); random weights may not (`vit-b16`
  98.50 %, `tiny` 98.6-99.3 %), because the int8 noise of the ViT blocks alone flips near-tied
  assignments there.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import onnx

from segclip.export.errors import ExportError

# Kept in float32 in the fp16 graph. LayerNormalization/Softmax/Reduce* as docs/runtime-practice.md
# asks; Equal because the hard assignment compares the softmax with its max; Erf/Sqrt/Pow are
# cheap and range-sensitive.
FP16_KEEP_FLOAT32 = ("LayerNormalization", "Softmax", "ReduceMax", "ReduceMean", "ReduceSum",
                     "ReduceL2", "Equal", "Erf", "Sqrt", "Pow")
INT8_OP_TYPES = ("MatMul", "Gemm")
# The int8 graph quantises the MatMul/Gemm weights of the ViT blocks on the patch tokens only,
# resblocks[0, group_layer) (node names carry module paths: "/resblocks.3/mlp/c_fc/Gemm").
# Everything else stays float32: module (node names) -> why. Figures (measured on the
# `nn.MultiheadAttention` trace, before `LeanBlock`s): ONNX Runtime CPU vs
# PyTorch, export parity cases unless noted; docs/export.md and
# bench/results/cpu-2core-intel-xeon/precision-demo-tiny.json (trained model, eval split).
INT8_KEEP_FLOAT32 = {
    "semantic group (/group/...)":
        "its cross-attention makes the centers whose dot products with the patch keys are the "
        "mapping logits: int8 noise there flips the patch -> center argmax of near-tied patches. "
        "Region-argmax agreement, all int8 vs group float32: vit-b16 random weights 92.95 vs "
        "98.65 %, earlier demo model (2 cross layers) 99.10 vs 99.59 %; 4 % of the vit-b16 FLOPs",
    "blocks on the region tokens (/resblocks.{i}/ with i >= group_layer), ln_post/proj (/MatMul)":
        "they decide each region's label, not the assignment: int8 there flipped the label of "
        "a whole region (earlier demo model on the eval split: label maps 99.85 % vs 99.97 % "
        "equal to PyTorch's, mIoU 5.68 vs 5.76 %); L = 8 tokens, 0.8 % of the FLOPs, but fp32 "
        "weight traffic: int8 speed-up over fp32 on vit-b16 3.1x -> 2.9x (1 thread, batch 1)",
}
# Alternatives measured on vit-b16 random weights, region-argmax agreement (int8 / fp32 speed):
# each ViT block kept float32 gains 0.4-0.6 points alone, ~1.4 all ten; the blocks' c_fc kept
# float32 too 99.05 % (1.8x); + the first block 98.74 % (2.5x); per-tensor weights 98.60 %;
# reduce_range 98.03 %; uint8 weights 98.64 %; MatMulNBits 8-bit, blocks of 32 with int8
# activations 98.97 % (0.9x: slower than fp32).
_VIT_BLOCK = re.compile(r"^/resblocks\.(\d+)/")
_INT8_PRODUCTS = ("MatMulInteger", "DynamicQuantizeMatMul", "QGemm")


def convert_fp16(src: Path, dst: Path, keep_scope: str | None = None) -> None:
    """Write `dst`, the fp16 version of `src` with float32 inputs/outputs (`keep_scope`: the
    nodes whose names start with it also stay float32)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    nodes = [n.name for n in model.graph.node if keep_scope and n.name.startswith(keep_scope)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 value will be truncated" for tiny weights
        half = convert_float_to_float16(
            model, keep_io_types=True, node_block_list=nodes,
            op_block_list=sorted({*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FLOAT32}))
    graph = OnnxModel(half)
    graph.topological_sort()  # the converter appends its input Casts after their consumers
    onnx.save(graph.model, str(dst))


def quantised_in_int8(name: str, group_layer: int) -> bool:
    """Whether the MatMul/Gemm node called `name` is quantised: a ViT block before the group."""
    block = _VIT_BLOCK.match(name)
    return block is not None and int(block.group(1)) < group_layer


def int8_exclusions(graph: onnx.GraphProto, group_layer: int) -> list[str]:
    """Names for `quantize_dynamic(nodes_to_exclude=...)`: every MatMul/Gemm node outside the
    ViT blocks before the group. The quantiser first rewrites each Gemm into a MatMul named
    `<gemm>_MatMul` (+ Add) and matches exclusions against that name, so both are listed."""
    products = [node for node in graph.node if node.op_type in INT8_OP_TYPES]
    if not any(quantised_in_int8(node.name, group_layer) for node in products):
        raise ExportError(f"no MatMul/Gemm node of the ViT blocks before the group (named "
                          f"/resblocks.<i>/..., i < {group_layer}) in the image graph; the "
                          f"exporter's node naming changed, so export/precision.py's int8 rule "
                          f"needs updating")
    return [name for node in products if not quantised_in_int8(node.name, group_layer)
            for name in ((node.name, f"{node.name}_MatMul") if node.op_type == "Gemm"
                         else (node.name,))]


def quantize_int8(src: Path, dst: Path, group_layer: int) -> None:
    """Write `dst`: dynamic int8 quantisation of the MatMul/Gemm weights of the ViT blocks
    [0, group_layer) of `src` (CPU variant; the rest stays float32, see `INT8_KEEP_FLOAT32`).

    ONNX Runtime's pre-processing (ONNX shape inference, basic graph optimisation) runs
    first, as its quantiser recommends; its output goes to a temp file beside `dst`.

    Raises:
        ExportError: nothing got quantised, or a node outside those blocks got quantised.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dst.with_name(f".{dst.name}.prep.onnx")
    root, quant_logger = logging.getLogger(), logging.getLogger("onnxruntime.quantization")
    levels = root.level, quant_logger.level
    root.setLevel(logging.ERROR)  # the quantiser logs its advice on the root logger
    quant_logger.setLevel(logging.ERROR)
    try:
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared), load_external_data=False).graph
        excluded = int8_exclusions(graph, group_layer)
        quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=list(INT8_OP_TYPES),
                         weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=excluded, extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(levels[0])
        quant_logger.setLevel(levels[1])
        prepared.unlink(missing_ok=True)
    _check_int8(src, dst, group_layer)


def _check_int8(src: Path, dst: Path, group_layer: int) -> None:
    nodes = onnx.load(str(dst), load_external_data=False).graph.node
    quantised = [node.name for node in nodes if node.op_type in _INT8_PRODUCTS]
    if not quantised:
        raise ExportError(f"int8 quantisation of {src.name} quantised no MatMul/Gemm; ops "
                          f"found: {sorted({node.op_type for node in nodes})}")
    leaked = [name for name in quantised if not quantised_in_int8(name, group_layer)]
    if leaked:  # an onnxruntime version that names or matches exclusions differently
        raise ExportError(f"int8 quantisation of {src.name} quantised {leaked[:3]} outside the "
                          f"ViT blocks [0, {group_layer}), which must stay float32; this "
                          f"onnxruntime version ignores precision.int8_exclusions")
