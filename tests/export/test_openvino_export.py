"""`segclip-export openvino` (export/openvino.py): the int8 IR, per-variant parity recorded in
segclip.json, calibration inputs, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from segclip.export.calibration import calibration_windows, folder_windows  # noqa: E402
from segclip.export.cli import app  # noqa: E402
from segclip.export.errors import ExportError  # noqa: E402
from segclip.runtime import contract  # noqa: E402
from segclip.runtime.bundle import Bundle  # noqa: E402

pytestmark = pytest.mark.openvino  # run in their own process by `make test`

runner = CliRunner()


@pytest.fixture(scope="module")
def ov_export(bundle: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory,
              ) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("ov-export") / "bundle"
    shutil.copytree(bundle, root)
    result = runner.invoke(app, ["openvino", str(root), str(tiny_checkpoint), "--int8",
                                 "--samples", "8"])
    return root, result


def _one_line_error(result: Any) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_export_records_every_variant_with_its_figures(ov_export: tuple[Path, Any]) -> None:
    root, result = ov_export
    assert result.exit_code == 0, result.output
    manifest = json.loads((root / contract.MANIFEST_FILE).read_text())
    section = manifest["openvino"]
    assert set(section["variants"]) == {"ov-f32", "ov-bf16", "ov-int8"}
    f32 = section["variants"]["ov-f32"]["parity"]
    assert f32["passed"] and max(f32["max_abs"].values()) <= 1e-4
    assert f32["argmax_agreement"] >= 0.999 and f32["min_agreement"] == 0.999
    assert section["text"]["passed"] and section["text"]["max_abs"] <= 1e-4
    for name in ("ov-bf16", "ov-int8"):
        parity = section["variants"][name]["parity"]
        if parity["passed"] is None:  # bf16 on a CPU without it
            assert "not measured" in parity["reason"]
            continue
        assert parity["min_agreement"] == 0.99
        assert parity["passed"] == (parity["argmax_agreement"] >= 0.99)
        assert f"{name}: " in result.stdout
    int8 = section["variants"]["ov-int8"]
    assert int8["file"] == "image.ov-int8.xml" and int8["quantisation"]["int8_weights"] > 0
    used = int8["parity"]["precision_used"]
    assert int8["precision"] == f"int8 (ViT blocks before the group), {used} elsewhere"
    assert used == ("bf16" if "BF16" in section["capabilities"] else "f32")
    assert "generated synthetic-shapes" in int8["quantisation"]["calibration"]
    assert not list(root.glob(".image.ov-int8.partial*")), "staged files left behind"
    sizes = manifest["file_bytes"]
    assert sizes["image.ov-int8.bin"] == (root / "image.ov-int8.bin").stat().st_size
    assert Bundle.open(root).files["image_ov_int8"].name == "image.ov-int8.xml"
    assert manifest["parity"]["passed"]  # the ONNX Runtime records are untouched


def test_the_int8_ir_is_quantised_inside_the_early_blocks_only(
        ov_export: tuple[Path, Any]) -> None:
    import openvino as ov

    model = ov.Core().read_model(str(ov_export[0] / "image.ov-int8.xml"))
    quantisers = [op.get_friendly_name() for op in model.get_ops()
                  if op.get_type_name() == "FakeQuantize"]
    assert quantisers
    assert all(name.startswith(tuple(f"/resblocks.{i}/" for i in range(4)))
               for name in quantisers), quantisers  # tiny: group_layer 4


def test_the_attention_products_stay_float(ov_export: tuple[Path, Any]) -> None:
    """q k^T and attn v (the blocks' un-named MatMuls) read no int8-quantised value, while the
    linear layers (Gemms) of the same blocks have int8 weights (export/openvino.py
    OV_INT8_KEEP_FLOAT32)."""
    import openvino as ov

    model = ov.Core().read_model(str(ov_export[0] / "image.ov-int8.xml"))

    def quantisers_above(op: Any) -> list[str]:
        """FakeQuantize nodes between `op` and the MatMul or Softmax that computed its inputs."""
        found, todo = [], [value.get_node() for value in op.input_values()]
        while todo:
            node = todo.pop()
            kind = node.get_type_name()
            if kind == "FakeQuantize":
                found.append(node.get_friendly_name())
            elif kind not in ("MatMul", "Softmax", "Parameter", "Constant"):
                todo += [value.get_node() for value in node.input_values()]
        return found

    matmuls = [op for op in model.get_ops() if op.get_type_name() == "MatMul"
               and op.get_friendly_name().startswith("/resblocks.0/")]
    products = [op for op in matmuls if re.fullmatch(r"/resblocks\.0/MatMul(_\d+)?",
                                                      op.get_friendly_name())]
    linears = [op for op in matmuls if "Gemm" in op.get_friendly_name()]
    assert len(products) == 2 and len(linears) == 6
    assert all(quantisers_above(op) == [] for op in products), \
        [quantisers_above(op) for op in products]
    assert all("fq_weights" in op.input_value(1).get_node().get_friendly_name()
               for op in linears)  # int8 weights, dequantised


def test_calibration_folder_is_preprocessed_like_the_runtime(tmp_path: Path) -> None:
    from segclip.runtime.images import preprocess

    rng = np.random.default_rng(0)
    arrays = [(rng.random((64, 150, 3)) * 255).astype(np.uint8) for _ in range(2)]
    for index, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / f"{index}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    windows = folder_windows(tmp_path, 5, 64, contract.CLIP_MEAN, contract.CLIP_STD)
    want = np.concatenate([preprocess(a, 64, contract.CLIP_MEAN, contract.CLIP_STD).windows
                           for a in arrays])[:5]
    np.testing.assert_allclose(windows, want, atol=1e-6)
    synthetic, described = calibration_windows(None, 3, 64, contract.CLIP_MEAN, contract.CLIP_STD)
    assert synthetic.shape == (3, 3, 64, 64) and "3 generated" in described
    assert np.ptp(synthetic) > 1.0  # real images, not constants
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="holds no images"):
        folder_windows(tmp_path / "empty", 1, 64, contract.CLIP_MEAN, contract.CLIP_STD)


def test_cli_errors_are_one_line_with_exit_2(bundle: Path, tiny_checkpoint: Path,
                                             tmp_path: Path) -> None:
    line = _one_line_error(runner.invoke(app, ["openvino", str(tmp_path), str(tiny_checkpoint)]))
    assert "not a segclip bundle" in line
    line = _one_line_error(runner.invoke(app, ["openvino", str(bundle),
                                               str(tmp_path / "missing.pt")]))
    assert "missing.pt" in line
    line = _one_line_error(runner.invoke(app, ["openvino", str(bundle), str(tiny_checkpoint),
                                               "--calibration", str(tmp_path)]))
    assert "--calibration is for --int8" in line
    line = _one_line_error(runner.invoke(app, ["openvino", str(bundle), str(tiny_checkpoint),
                                               "--int8", "--calibration", str(tmp_path / "no")]))
    assert "is not a folder of images" in line
    other = tmp_path / "other.pt"
    other.write_bytes(tiny_checkpoint.read_bytes())
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / contract.MANIFEST_FILE).read_text())
    manifest["source"]["checkpoint_sha256"] = "0" * 64
    (copy / contract.MANIFEST_FILE).write_text(json.dumps(manifest))
    line = _one_line_error(runner.invoke(app, ["openvino", str(copy), str(other)]))
    assert "exported from a checkpoint with sha256 000000000000" in line
