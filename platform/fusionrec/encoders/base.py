"""Text and image encoders behind one small interface: `name`, `dim`, `pooling`, `encode(batch)`.

Any Hugging Face BERT-family text model or ViT/DINOv2 image model loads by local path or by
name (from the local Hugging Face cache; nothing is downloaded). The defaults are the offline
models that `fusionrec models prepare` makes ready (or their first use does). Pooling is the CLS
token (as in the paper) or the mean of the token states.

A text can be read whole (`chunks="none"`, the paper's) or sentence by sentence
(`chunks="sentence"`): each sentence is encoded on its own and the sentence vectors are pooled
(`chunk_pooling` mean or max), or kept as a set (`set`): the first SET_SIZE sentence vectors side
by side, zero-padded, for a model to attend over (FusionNeuMF's SetPooling). A self-introduction
that states three tastes in three sentences then keeps each of them in a vector of its own,
instead of squeezing all five sentences through one CLS token.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fusionrec.encoders.prepare import (
    DINOV2_NAME,
    IMAGENET_MEAN,
    IMAGENET_STD,
    dinov2_path,
    minilm_path,
    pixels,
    prepare,
)

DEFAULT_TEXT_MODEL = "all-minilm-l6-v2"
DEFAULT_IMAGE_MODEL = DINOV2_NAME
POOLINGS = ("cls", "mean")
TEXT_CHUNKS = ("none", "sentence")
CHUNK_POOLINGS = ("mean", "max", "set")
SET_SIZE = 8  # sentence vectors a `set` keeps per text; sentences past the 8th are averaged into the last
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")  # a full stop, ! or ? followed by white space


class Encoder(Protocol):
    name: str
    dim: int
    pooling: str

    def encode(self, batch: list) -> np.ndarray:
        """[len(batch), dim] float32 embeddings."""
        ...


def resolve_model(model: str, cache: Path) -> str:
    """A loadable path (or hub name) for a model given by alias, path or name; the default ViT is
    prepared in `cache` on first use."""
    if model == DEFAULT_TEXT_MODEL:
        return str(minilm_path())
    if model == DEFAULT_IMAGE_MODEL:
        path = dinov2_path(cache)
        if not (path / "config.json").is_file():
            prepare(cache)  # first use: convert the packaged ONNX once (offline, parity-checked)
        return str(path)
    return model


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`, else a one-line ValueError naming `what`."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_pooling(pooling: str) -> str:
    return check_choice("pooling", pooling, POOLINGS)


def sentences(text: str) -> list[str]:
    """A text cut after each full stop, ! or ?; a text with none (or only white space) is one chunk."""
    return [part for part in (p.strip() for p in SENTENCE_END.split(text)) if part] or [text]


def set_size(chunks: str, chunk_pooling: str) -> int:
    """How many vectors one text's embedding holds: SET_SIZE for sentence sets, else 1 (a text
    read whole has no chunks to pool, whatever the chunk pooling)."""
    return SET_SIZE if chunks == "sentence" and chunk_pooling == "set" else 1


def _as_set(vectors: np.ndarray) -> np.ndarray:
    """[sentences, hidden] -> [SET_SIZE * hidden]: the sentence vectors in order, zero-padded; the
    sentences past SET_SIZE - 1 share the last slot (their mean), so no sentence is dropped."""
    kept = vectors if len(vectors) <= SET_SIZE else np.concatenate(
        [vectors[:SET_SIZE - 1], vectors[SET_SIZE - 1:].mean(0, keepdims=True)])
    padded = np.zeros((SET_SIZE, vectors.shape[1]), vectors.dtype)
    padded[:len(kept)] = kept
    return padded.reshape(-1)


def load_pretrained(model: str, loader):
    """`loader.from_pretrained(model)`, offline, with a one-line error naming the model."""
    try:
        return loader.from_pretrained(model)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load model {model!r} offline: {str(exc).splitlines()[0]}") from exc


class TextEncoder:
    """A BERT-family encoder: texts -> CLS (or mean of non-padding tokens) of the last layer; with
    `chunks="sentence"`, of each sentence, then pooled over the text's sentences."""

    def __init__(self, model: str, pooling: str = "cls", max_length: int = 128, device: str = "cpu",
                 name: str | None = None, chunks: str = "none", chunk_pooling: str = "mean"):
        from transformers import AutoModel, AutoTokenizer

        self.pooling = _check_pooling(pooling)
        self.chunks = check_choice("text chunks", chunks, TEXT_CHUNKS)
        self.chunk_pooling = check_choice("chunk pooling", chunk_pooling, CHUNK_POOLINGS)
        self.set_size = set_size(chunks, chunk_pooling)
        self.tokenizer = load_pretrained(model, AutoTokenizer)
        self.model = load_pretrained(model, AutoModel).eval().to(device)
        self.device, self.max_length = device, max_length
        self.name = name or Path(model).name
        self.dim = int(self.model.config.hidden_size) * self.set_size  # a set: its vectors side by side

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.chunks == "none":
            return self._encode(list(texts))
        pieces = [sentences(str(text)) for text in texts]
        vectors = self._encode([piece for text in pieces for piece in text])  # [all sentences, hidden]
        ends = np.cumsum([len(text) for text in pieces])
        groups = [vectors[end - len(text):end] for end, text in zip(ends, pieces, strict=True)]
        if self.chunk_pooling == "set":
            return np.stack([_as_set(group) for group in groups])
        pool = np.mean if self.chunk_pooling == "mean" else np.max
        return np.stack([pool(group, axis=0) for group in groups])

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        hidden = self.model(**tokens).last_hidden_state  # [batch, tokens, dim]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [batch, tokens, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return pooled.float().cpu().numpy()


class ImageEncoder:
    """A ViT/DINOv2 encoder: RGB images -> CLS (or mean of patch tokens) of the last layer.

    Images are resized to `image_size` (bicubic) and normalised with the model's mean/std
    (its preprocessor_config.json, else ImageNet's). Token count grows with (size / patch)^2,
    so a smaller size is the big speed lever, at some cost in quality."""

    def __init__(self, model: str, pooling: str = "cls", image_size: int | None = None, device: str = "cpu",
                 name: str | None = None):
        from transformers import AutoModel

        self.pooling = _check_pooling(pooling)
        self.model = load_pretrained(model, AutoModel).eval().to(device)
        preprocessing = Path(model) / "preprocessor_config.json"
        config = json.loads(preprocessing.read_text()) if preprocessing.is_file() else {}
        size = config.get("size", self.model.config.image_size)
        if isinstance(size, dict):  # Hugging Face writes {"height": H, "width": W} or {"shortest_edge": S}
            size = size.get("height") or size.get("shortest_edge")
        self.image_size = int(image_size or size)
        self.mean = config.get("image_mean", IMAGENET_MEAN)
        self.std = config.get("image_std", IMAGENET_STD)
        self.device = device
        self.name = name or Path(model).name
        self.dim = int(self.model.config.hidden_size)
        # Plain ViT keeps a fixed grid unless told to interpolate; DINOv2 always interpolates.
        self.extra = {"interpolate_pos_encoding": True} if self.model.config.model_type == "vit" else {}

    @torch.inference_mode()
    def encode(self, images: list) -> np.ndarray:
        batch = np.stack([pixels(image, self.image_size, self.mean, self.std) for image in images])
        hidden = self.model(pixel_values=torch.from_numpy(batch).to(self.device), **self.extra).last_hidden_state
        pooled = hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(1)  # [batch, dim]
        return pooled.float().cpu().numpy()
