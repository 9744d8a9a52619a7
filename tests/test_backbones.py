"""The plain-torch BERT and DINOv2 (encoders/backbones.py) give transformers' hidden states, and keep
transformers out of a process that only builds encoders and runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fusionrec.encoders import backbones
from fusionrec.encoders.base import ImageEncoder, TextEncoder


def perturbed(folder, tmp_path):
    """(our model, transformers' model) of a copy of the checkpoint with every weight moved at
    random: layer scales, norms and biases then differ across channels, as trained ones do."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    torch.manual_seed(2)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(0.1 * torch.randn_like(weight))
    model.save_pretrained(tmp_path / folder.name)
    return backbones.load(str(tmp_path / folder.name)), model


@torch.inference_mode()
def test_bert_matches_transformers_with_padding(tiny_models, tmp_path):
    ours, theirs = perturbed(tiny_models["bert"], tmp_path)
    assert isinstance(ours, backbones.Bert)
    ids = torch.randint(1, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:], mask[2, 2:] = 0, 0  # two padded rows
    got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    want = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()  # what the encoders read: the tokens, never the padding
    assert got.shape == want.shape and torch.allclose(got[real], want[real], atol=1e-5)


@torch.inference_mode()
@pytest.mark.parametrize("side", [32, 48])  # the table's own 4 x 4 grid, and one resized to 6 x 6
def test_dinov2_matches_transformers(tiny_models, tmp_path, side):
    ours, theirs = perturbed(tiny_models["dinov2"], tmp_path)
    assert isinstance(ours, backbones.Dinov2)
    pixels = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    got, want = ours(pixel_values=pixels).last_hidden_state, theirs(pixel_values=pixels).last_hidden_state
    assert got.shape == want.shape == (2, 1 + (side // 8) ** 2, 32) and torch.allclose(got, want, atol=1e-5)


@pytest.mark.integration
@torch.inference_mode()
def test_the_default_encoders_match_transformers(real_models_cache):
    """MiniLM and DINOv2 ViT-S/14 (its 37 x 37 table resized to 224 px's 16 x 16), as shipped."""
    from transformers import AutoModel

    from fusionrec.encoders.base import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, resolve_model

    generator = torch.Generator().manual_seed(0)
    text, image = (resolve_model(m, real_models_cache) for m in (DEFAULT_TEXT_MODEL, DEFAULT_IMAGE_MODEL))
    ids = torch.randint(1000, 30000, (4, 20), generator=generator)
    mask = (torch.arange(20) < torch.tensor([[20], [12], [5], [17]])).long()
    got = backbones.load(text)(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
    want = AutoModel.from_pretrained(text)(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
    assert (got - want).abs().max() < 1e-4
    pixels = torch.randn(2, 3, 224, 224, generator=generator)
    got = backbones.load(image)(pixel_values=pixels).last_hidden_state
    want = AutoModel.from_pretrained(image)(pixel_values=pixels).last_hidden_state
    assert got.shape == (2, 257, 384) and (got - want).abs().max() < 1e-4


def test_other_architectures_and_settings_load_through_transformers(tiny_models, tmp_path):
    assert backbones.load(str(tiny_models["vit"])) is None  # not one of ours
    relu = tmp_path / "relu-bert"
    shutil.copytree(tiny_models["bert"], relu)
    config = json.loads((relu / "config.json").read_text())
    (relu / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    assert backbones.load(str(relu)) is None  # a setting ours leave out
    encoder = TextEncoder(str(relu))
    assert type(encoder.model).__name__ == "BertModel"  # transformers' own
    gelu = TextEncoder(str(tiny_models["bert"]))
    assert not np.allclose(encoder.encode(["a silk dress"]), gelu.encode(["a silk dress"]))  # relu was applied
    assert type(ImageEncoder(str(tiny_models["vit"])).model).__name__ == "ViTModel"


def test_building_and_running_the_encoders_never_imports_transformers(tiny_models):
    """What a pipeline actor does: load both encoders, run forward passes on preprocessed arrays."""
    script = f"""
import sys, numpy as np
from fusionrec.encoders.base import ImageEncoder, TextEncoder
text = TextEncoder({str(tiny_models["bert"])!r}, chunks="sentence")
image = ImageEncoder({str(tiny_models["dinov2"])!r})
assert text.forward([np.array([101, 7, 102], np.int32)], [np.array([3], np.int32)]).shape == (1, 32)
assert image.forward(np.zeros((2, image.image_size, image.image_size, 3), np.uint8)).shape == (2, 32)
print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
