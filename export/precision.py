"""Reduced-precision variants of the image graph (DESIGN.md "Bundle contract": image.fp16.onnx;
reference/runtime-practice.md pitfall 2, "FP16 transformer overflow").

- fp16: `onnxruntime.transformers.float16` (no extra dependency) with float32 graph I/O; norms,
  softmaxes, reductions and the hard-assignment comparison stay float32, where fp16 overflows or
  flips ties. It is the input of TensorRT 11's strongly typed fp16 build.
- int8: ONNX Runtime dynamic quantisation of MatMul/Gemm weights (int8, per output channel);
  activations are quantised on the fly (uint8, one scale per tensor, so over the whole batch).
  A CPU variant; activation x activation products stay float32. On random weights it flips the
  region argmax of 5-12% of pixels (near-tied assignments), so the 99% parity bar refuses it;
  measure it on trained weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx

from segclip.export.errors import ExportError

# Kept in float32 in the fp16 graph. LayerNormalization/Softmax/Reduce* as runtime-practice.md
# asks; Equal because the hard assignment compares the softmax with its max; Erf/Sqrt/Pow are
# cheap and range-sensitive.
FP16_KEEP_FLOAT32 = ("LayerNormalization", "Softmax", "ReduceMax", "ReduceMean", "ReduceSum",
                     "ReduceL2", "Equal", "Erf", "Sqrt", "Pow")
INT8_OP_TYPES = ("MatMul", "Gemm")


def convert_fp16(src: Path, dst: Path) -> None:
    """Write `dst`, the fp16 version of `src` with float32 inputs/outputs."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 value will be truncated" for tiny weights
        half = convert_float_to_float16(
            model, keep_io_types=True,
            op_block_list=sorted({*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FLOAT32}))
    graph = OnnxModel(half)
    graph.topological_sort()  # the converter appends its input Casts after their consumers
    onnx.save(graph.model, str(dst))


def quantize_int8(src: Path, dst: Path) -> None:
    """Write `dst`: dynamic int8 quantisation of the MatMul/Gemm weights of `src` (CPU variant).

    ONNX Runtime's pre-processing (ONNX shape inference, basic graph optimisation) runs
    first, as its quantiser recommends; its output goes to a temp file beside `dst`.
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dst.with_name(f".{dst.name}.prep.onnx")
    root, quant_logger = logging.getLogger(), logging.getLogger("onnxruntime.quantization")
    levels = root.level, quant_logger.level
    root.setLevel(logging.ERROR)  # the quantiser logs its advice on the root logger
    quant_logger.setLevel(logging.ERROR)
    try:
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=list(INT8_OP_TYPES),
                         weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(levels[0])
        quant_logger.setLevel(levels[1])
        prepared.unlink(missing_ok=True)
    ops = {node.op_type for node in onnx.load(str(dst), load_external_data=False).graph.node}
    if not ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QGemm", "DynamicQuantizeLinear"}:
        raise ExportError(f"int8 quantisation of {src.name} quantised no MatMul/Gemm; "
                          f"ops found: {sorted(ops)}")
