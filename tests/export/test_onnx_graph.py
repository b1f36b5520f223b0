"""The exported graphs (docs/architecture.md "Bundle contract"): I/O contract, dynamic batch and
label count
from one file, no forbidden ops, parity with eager at every size (tolerance 1e-4)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from segclip.export import ExportError
from segclip.export.onnx_graph import (
    FORBIDDEN_OPS,
    check_graph,
    check_opset,
    image_specs,
    text_specs,
)
from segclip.export.wrappers import ImageEncoderOnnx
from segclip.runtime import contract

TOL = 1e-4


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_image_graph_runs_any_batch(bundle: Path, checkpoint_model: Any, batch: int) -> None:
    size = checkpoint_model.config.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    outputs = _session(bundle / contract.IMAGE_ONNX).run(
        list(contract.IMAGE_OUTPUTS), {contract.IMAGE_INPUT: images.numpy()})
    with torch.no_grad():
        eager = checkpoint_model.encode_image(images)
    c = checkpoint_model.config
    expected = {contract.GLOBAL_OUTPUT: (eager.global_embedding, (batch, c.embed_dim)),
                contract.REGIONS_OUTPUT: (eager.regions, (batch, c.num_centers, c.embed_dim)),
                contract.ASSIGN_OUTPUT: (eager.assign, (batch, c.num_centers, c.grid_size,
                                                        c.grid_size))}
    for name, got in zip(contract.IMAGE_OUTPUTS, outputs):
        want, shape = expected[name]
        assert got.dtype == np.float32 and got.shape == shape, name
        assert np.abs(got - want.numpy()).max() <= TOL, name
    norms = np.linalg.norm(outputs[1], axis=-1)  # (B, L)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    np.testing.assert_allclose(outputs[2].sum(axis=1), 1.0, atol=1e-5)  # softmax over L


@pytest.mark.parametrize("labels", [1, 5, 100])
def test_text_graph_runs_any_label_count(bundle: Path, checkpoint_model: Any,
                                         labels: int) -> None:
    from segclip.text import tokenize

    words = ["cat", "dog", "red square", "blue circle", "tree", "sky", "road"]
    prompts = [f"a photo of a {words[i % len(words)]} number {i}." for i in range(labels)]
    tokens = tokenize(prompts, context_length=77)  # (T, 77) int64
    got = _session(bundle / contract.TEXT_ONNX).run(
        [contract.TEXT_OUTPUT], {contract.TEXT_INPUT: tokens.numpy()})[0]
    with torch.no_grad():
        want = checkpoint_model.encode_text(tokens).numpy()
    assert got.shape == (labels, checkpoint_model.config.embed_dim)
    assert np.abs(got - want).max() <= TOL
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", [contract.IMAGE_ONNX, contract.IMAGE_FP16_ONNX])
def test_image_graph_contract(bundle: Path, checkpoint_model: Any, name: str) -> None:
    ops = check_graph(bundle / name, 17, *image_specs(checkpoint_model))
    model = onnx.load(str(bundle / name))
    image = model.graph.input[0]
    dims = image.type.tensor_type.shape.dim
    assert image.name == contract.IMAGE_INPUT
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims[0].dim_param == contract.BATCH_DIM and not dims[0].dim_value
    assert [o.name for o in model.graph.output] == list(contract.IMAGE_OUTPUTS)
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
               for o in model.graph.output)  # fp16 variant keeps float32 I/O
    assert not set(ops) & FORBIDDEN_OPS
    assert "LayerNormalization" in ops  # opset >= 17
    if name == contract.IMAGE_FP16_ONNX:
        half = {n.output[0] for n in model.graph.node if n.op_type == "Cast"
                and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)}
        assert half, "fp16 graph casts nothing to float16"


def test_text_graph_contract(bundle: Path, checkpoint_model: Any) -> None:
    ops = check_graph(bundle / contract.TEXT_ONNX, 17, *text_specs(checkpoint_model))
    tokens = onnx.load(str(bundle / contract.TEXT_ONNX)).graph.input[0]
    assert tokens.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert tokens.type.tensor_type.shape.dim[0].dim_param == contract.LABELS_DIM
    assert not set(ops) & FORBIDDEN_OPS


def test_check_graph_rejects_forbidden_ops(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    data = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    idx = helper.make_tensor("i", TensorProto.INT64, [1, 1], [0])
    upd = helper.make_tensor("u", TensorProto.FLOAT, [1, 1], [1.0])
    node = helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], axis=1)
    graph = helper.make_graph([node], "g", [data], [out], initializer=[idx, upd])
    path = tmp_path / "scatter.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    from segclip.export.onnx_graph import TensorSpec

    specs = ([TensorSpec("x", TensorProto.FLOAT, ("batch", 4))],
             [TensorSpec("y", TensorProto.FLOAT, ("batch", 4))])
    with pytest.raises(ExportError, match=r"forbids: \['ScatterElements'\]"):
        check_graph(path, 17, *specs)
    with pytest.raises(ExportError, match="opset"):
        check_graph(path, 18, *specs)


def test_check_opset_bounds() -> None:
    assert check_opset(17) == 17 and check_opset(20) == 20
    with pytest.raises(ExportError, match="got 16"):
        check_opset(16)


def test_image_wrapper_refuses_training_mode(checkpoint_model: Any) -> None:
    import copy

    model = copy.deepcopy(checkpoint_model).train()
    with pytest.raises(RuntimeError, match="eval mode"):
        ImageEncoderOnnx(model)(torch.zeros(1, 3, 64, 64))


def test_hard_assignment_has_no_scatter_or_onehot(bundle: Path) -> None:
    ops = Counter(n.op_type for n in onnx.load(str(bundle / contract.IMAGE_ONNX)).graph.node)
    assert ops["Equal"] >= 1  # the hard assignment is x == max(x)
    assert ops["OneHot"] == 0 and ops["ScatterElements"] == 0 and ops["ScatterND"] == 0
