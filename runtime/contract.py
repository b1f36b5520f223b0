"""The export <-> runtime contract: bundle files, tensor names, dtypes and defaults
(docs/architecture.md).

Defined once, here, on the side that cannot import torch; `segclip.export` imports it.
Layouts: B images, 3 channels, S window side, L regions (centers), h x w patch grid, D embedding
width, T labels, C context length.
"""

from __future__ import annotations

BUNDLE_FORMAT = "segclip-bundle"
BUNDLE_VERSION = 1
MANIFEST_FILE = "segclip.json"

IMAGE_ONNX = "image.onnx"
IMAGE_FP16_ONNX = "image.fp16.onnx"
IMAGE_INT8_ONNX = "image.int8.onnx"
TEXT_ONNX = "text.onnx"
TOKENIZER_FILE = "tokenizer.json"
IMAGE_PLAN = "image.plan"
TEXT_PLAN = "text.plan"

# image tower: input float32 [B,3,S,S] (CLIP-normalised RGB)
IMAGE_INPUT = "image"
# outputs: float32 [B,D] and [B,L,D] (both L2-normalised), float32 [B,L,h,w] soft assignment
GLOBAL_OUTPUT = "global"
REGIONS_OUTPUT = "regions"
ASSIGN_OUTPUT = "assign"
IMAGE_OUTPUTS = (GLOBAL_OUTPUT, REGIONS_OUTPUT, ASSIGN_OUTPUT)
# a bundle of kind "dense" (docs/dense.md): one output, float32 [B,h*w,D] L2-normalised patch
# embeddings, row-major on the h x w grid
DENSE_KIND = "dense"
PATCH_OUTPUT = "patch_emb"

# text tower: input int64 [T,C] token ids (int32 accepted by TensorRT engines); output [T,D]
TEXT_INPUT = "tokens"
TEXT_OUTPUT = "text"

# symbolic (dynamic) dimension names of the ONNX graphs: image batch B, label count T
BATCH_DIM = "batch"
LABELS_DIM = "labels"

# preprocessing and inference defaults (official protocol, docs/official-implementation.md §4)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TEMPLATE = "a photo of a {}."
DEFAULT_TOP_K = 5
DEFAULT_THRESHOLD = 0.8
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
