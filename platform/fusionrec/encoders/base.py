"""Text and image encoders behind one small interface: `name`, `dim`, `pooling`, `encode(batch)`.

Any Hugging Face BERT-family text model or ViT/DINOv2 image model loads by local path or by
name (from the local Hugging Face cache; nothing is downloaded). BERT and DINOv2 checkpoints, the
defaults among them, run on the plain-torch modules of encoders/backbones.py, which load in a
fraction of the time transformers takes; the others run on transformers' AutoModel. The defaults
are the offline models that `fusionrec models prepare` makes ready (or their first use does).
Pooling is the CLS token (as in the paper) or the mean of the token states.

A text can be read whole (`chunks="none"`, the paper's) or sentence by sentence
(`chunks="sentence"`): each sentence is encoded on its own and the sentence vectors are pooled
(`chunk_pooling` mean or max), or kept as a set (`set`): the first SET_SIZE sentence vectors side
by side, zero-padded, for a model to attend over (FusionNeuMF's SetPooling). A self-introduction
that states three tastes in three sentences then keeps each of them in a vector of its own,
instead of squeezing all five sentences through one CLS token.

Each encoder is split where the Ray Data pipeline splits it (encoders/batch_inference.py): the
preprocessing runs without the model on any CPU (`tokenize`, `resized_rgb`), and `forward` only
moves compact arrays (token ids, uint8 pixels) to the device and runs the model. `encode` does
both, for a handful of payloads in one process (the service's cold-start users, tests).
"""

from __future__ import annotations

import functools
import itertools
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
    prepare,
    resized_rgb,
)

DEFAULT_TEXT_MODEL = "all-minilm-l6-v2"
DEFAULT_IMAGE_MODEL = DINOV2_NAME
POOLINGS = ("cls", "mean")
TEXT_CHUNKS = ("none", "sentence")
CHUNK_POOLINGS = ("mean", "max", "set")
PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SET_SIZE = 8  # sentence vectors a `set` keeps per text; sentences past the 8th are averaged into the last
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")  # a full stop, ! or ? followed by white space
MAX_TEXT_TOKENS = 128  # per sentence (or whole text): longer ones are truncated
# Tokens in one text forward pass: sentences sorted by length are cut into batches of about this
# many tokens, each padded only to its own longest sentence.
FORWARD_TOKENS = {"cpu": 4096, "cuda": 65536}


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


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: bf16 on CUDA (the H200 runs the ViT 5x faster in it), fp32 on the CPU."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


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


def load_model(model: str):
    """The network for `model` in eval mode: the plain-torch BERT or DINOv2 of encoders/backbones.py
    where it reads the checkpoint (transformers is never imported, so a pipeline actor is ready in a
    fraction of a second), else transformers' AutoModel."""
    from fusionrec.encoders.backbones import load

    network = load(model)
    if network is not None:
        return network
    from transformers import AutoModel

    return load_pretrained(model, AutoModel).eval()


def load_pretrained(model: str, loader):
    """`loader.from_pretrained(model)`, offline, with a one-line error naming the model."""
    try:
        return loader.from_pretrained(model)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load model {model!r} offline: {str(exc).splitlines()[0]}") from exc


@functools.cache
def tokenizer_for(model: str):
    """One tokenizer per model and process (Ray reuses a worker process across tasks)."""
    from transformers import AutoTokenizer

    return load_pretrained(model, AutoTokenizer)


def tokenize(model: str, texts, chunks: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per text: its token ids (every sentence's, one after another, unpadded) and each sentence's
    length. The model is not needed: this runs in the pipeline's CPU tasks."""
    pieces = [sentences(str(text)) if chunks == "sentence" else [str(text)] for text in texts]
    ids = tokenizer_for(model)([p for text in pieces for p in text], truncation=True, max_length=MAX_TEXT_TOKENS,
                               return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    lengths = np.array([len(sentence) for sentence in ids], np.int32)
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(lengths.sum()))
    counts = [len(text) for text in pieces]  # sentences per text
    sentence_ends = np.cumsum(lengths)
    text_ends = np.cumsum(counts)
    token_ends = sentence_ends[text_ends - 1]
    token_starts = np.concatenate([[0], token_ends[:-1]])
    tokens = [flat[a:b] for a, b in zip(token_starts, token_ends, strict=True)]
    lengths = np.split(lengths, text_ends[:-1])
    return tokens, lengths


def to_device(array: np.ndarray, device: str) -> torch.Tensor:
    """A host array on `device`; on CUDA through pinned memory, so the copy runs asynchronously."""
    tensor = torch.from_numpy(array)
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


class TextEncoder:
    """A BERT-family encoder: texts -> CLS (or mean of non-padding tokens) of the last layer; with
    `chunks="sentence"`, of each sentence, then pooled over the text's sentences."""

    def __init__(self, model: str, pooling: str = "cls", device: str = "cpu", name: str | None = None,
                 chunks: str = "none", chunk_pooling: str = "mean", precision: str = "fp32"):
        self.pooling = _check_pooling(pooling)
        self.chunks = check_choice("text chunks", chunks, TEXT_CHUNKS)
        self.chunk_pooling = check_choice("chunk pooling", chunk_pooling, CHUNK_POOLINGS)
        self.set_size = set_size(chunks, chunk_pooling)
        self.model_path = model
        self.precision = resolve_precision(precision, device)
        self.model = load_model(model).to(device, DTYPES[self.precision])
        # Padding is masked out of attention and pooling, so any valid id will do; the config's
        # (not the tokenizer's) keeps transformers out of the pipeline's model actors.
        self.pad_id = getattr(self.model.config, "pad_token_id", None) or 0
        self.device = device
        self.name = name or Path(model).name
        self.dim = int(self.model.config.hidden_size) * self.set_size  # a set: its vectors side by side

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.forward(*tokenize(self.model_path, texts, self.chunks))

    def forward(self, tokens, lengths) -> np.ndarray:
        """[texts, dim] from `tokenize`'s output: every sentence through the model, then pooled per text."""
        lengths = [np.asarray(n, np.int64) for n in lengths]
        per_text = np.array([len(n) for n in lengths])
        sentence_vectors = self._sentence_vectors(np.concatenate(tokens).astype(np.int64), np.concatenate(lengths))
        firsts = np.concatenate([[0], np.cumsum(per_text)[:-1]])  # each text's first sentence
        if self.chunk_pooling == "set" and self.chunks == "sentence":
            return np.stack([_as_set(sentence_vectors[a:a + n]) for a, n in zip(firsts, per_text, strict=True)])
        if self.chunk_pooling == "max":
            return np.maximum.reduceat(sentence_vectors, firsts, axis=0)
        return np.add.reduceat(sentence_vectors, firsts, axis=0) / per_text[:, None].astype(np.float32)

    @torch.inference_mode()
    def _sentence_vectors(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """[sentences, hidden] for sentences given as their ids one after another. Sentences are
        sorted by length and run in batches of about FORWARD_TOKENS tokens, each padded to its own
        longest, so little of the compute goes to padding; one copy back at the end."""
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        order = np.argsort(lengths, kind="stable")
        widths = lengths[order]  # ascending: a batch's last sentence is its longest
        budget = FORWARD_TOKENS["cuda" if self.device.startswith("cuda") else "cpu"]
        pooled, begin = [], 0
        while begin < len(order):
            fits = np.arange(1, len(order) - begin + 1) * widths[begin:] <= budget  # True, then False
            end = begin + (len(fits) if fits.all() else max(1, int(fits.argmin())))
            chosen = order[begin:end]
            width = int(lengths[chosen].max())
            columns = np.arange(width)
            mask = columns[None, :] < lengths[chosen][:, None]  # [batch, width]
            positions = np.minimum(starts[chosen][:, None] + columns[None, :], len(ids) - 1)
            batch = np.where(mask, ids[positions], self.pad_id)
            mask_t = to_device(mask.astype(np.int64), self.device)
            hidden = self.model(input_ids=to_device(batch, self.device), attention_mask=mask_t).last_hidden_state
            if self.pooling == "cls":
                pooled.append(hidden[:, 0].float())
            else:
                weights = mask_t.unsqueeze(-1).to(hidden.dtype)  # [batch, tokens, 1]
                pooled.append(((hidden * weights).sum(1) / weights.sum(1).clamp(min=1)).float())
            begin = end
        vectors = np.empty((len(order), self.model.config.hidden_size), np.float32)
        vectors[order] = torch.cat(pooled).cpu().numpy()
        return vectors


def image_settings(model: str, config) -> tuple[int, tuple, tuple]:
    """(side in pixels, mean, std) the model expects: its preprocessor_config.json, else its
    config's image size and ImageNet's statistics."""
    preprocessing = Path(model) / "preprocessor_config.json"
    settings = json.loads(preprocessing.read_text()) if preprocessing.is_file() else {}
    size = settings.get("size", config.image_size)
    if isinstance(size, dict):  # Hugging Face writes {"height": H, "width": W} or {"shortest_edge": S}
        size = size.get("height") or size.get("shortest_edge")
    return int(size), tuple(settings.get("image_mean", IMAGENET_MEAN)), tuple(settings.get("image_std", IMAGENET_STD))


class ImageEncoder:
    """A ViT/DINOv2 encoder: RGB images -> CLS (or mean of patch tokens) of the last layer.

    Images are resized to `image_size` (bicubic) and normalised with the model's mean/std
    (its preprocessor_config.json, else ImageNet's). Token count grows with (size / patch)^2,
    so a smaller size is the big speed lever, at some cost in quality."""

    def __init__(self, model: str, pooling: str = "cls", image_size: int | None = None, device: str = "cpu",
                 name: str | None = None, precision: str = "fp32"):
        self.pooling = _check_pooling(pooling)
        self.precision = resolve_precision(precision, device)
        self.model = load_model(model).to(device, DTYPES[self.precision])
        size, mean, std = image_settings(model, self.model.config)
        self.image_size = int(image_size or size)
        self.device = device
        # [1, 3, 1, 1] on the device: pixels travel as uint8 and are normalised there.
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.name = name or Path(model).name
        self.dim = int(self.model.config.hidden_size)
        # Plain ViT keeps a fixed grid unless told to interpolate; DINOv2 always interpolates.
        self.extra = {"interpolate_pos_encoding": True} if self.model.config.model_type == "vit" else {}

    def encode(self, images: list) -> np.ndarray:
        return self.forward(np.stack([resized_rgb(image, self.image_size) for image in images]))

    @torch.inference_mode()
    def forward(self, rgb: np.ndarray) -> np.ndarray:
        """[images, dim] from uint8 pixels [images, size, size, 3] (`resized_rgb`'s)."""
        pixels = to_device(rgb, self.device).permute(0, 3, 1, 2).float().div_(255)  # [batch, 3, size, size]
        pixels = ((pixels - self.mean) / self.std).to(DTYPES[self.precision])
        hidden = self.model(pixel_values=pixels, **self.extra).last_hidden_state
        pooled = hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(1)  # [batch, dim]
        return pooled.float().cpu().numpy()
