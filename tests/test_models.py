"""Models behind one interface, on small random content (no Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fusionrec.data.schema import TableSpec
from fusionrec.evaluate import full_ranking
from fusionrec.models.bundle import load_bundle, save_bundle
from fusionrec.models.config import MODELS, NO_GRADIENT, VARIANTS, ModelConfig
from fusionrec.models.content import StructuredEncoder, bag_of_words, build_side
from fusionrec.models.factory import BUILDERS, build_model
from fusionrec.models.layers import Codebooks, SetPooling, set_mean
from fusionrec.training.config import TrainConfig


def sides(n_users=6, n_items=5):
    rng = np.random.default_rng(0)
    users = pd.DataFrame({"user_id": [f"u{k}" for k in range(n_users)], "bio": ["likes silk"] * n_users,
                          "region": rng.choice(["n", "s"], n_users), "age": rng.integers(18, 70, n_users)})
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(n_items)], "text": ["a silk dress"] * n_items,
                          "brand": rng.choice(["x", "y", "z"], n_items)})
    u = build_side(users, TableSpec("user_id", text="bio", categorical=("region",), numeric=("age",)), "users", None)
    i = build_side(items, TableSpec("item_id", text="text", categorical=("brand",)), "items", None)
    # pretend encoders ran: 8-d text and image embeddings (plus the zero unknown row)
    for side in (u, i):
        side.text = np.vstack([rng.normal(size=(side.n, 8)), np.zeros((1, 8))]).astype(np.float32)
        side.image = np.vstack([rng.normal(size=(side.n, 8)), np.zeros((1, 8))]).astype(np.float32)
    return u, i


def test_structured_encoder_one_hot_and_z_scores():
    table = pd.DataFrame({"colour": ["red", "blue", None], "age": [20.0, 40.0, None]})
    encoder = StructuredEncoder.fit(table, TableSpec("id", categorical=("colour",), numeric=("age",)))
    out = encoder.transform(table)
    assert encoder.categorical == {"colour": ["blue", "red"]} and out.shape == (3, 3)
    assert out[:, :2].tolist() == [[0, 1], [1, 0], [0, 0]]  # unseen/missing level -> all zeros
    assert np.allclose(out[:, 2], [-1 / np.sqrt(2), 1 / np.sqrt(2), 0.0])  # (x - 30) / std, missing -> 0
    assert StructuredEncoder.from_dict(encoder.to_dict()).transform(table).tolist() == out.tolist()


def test_bag_of_words_is_stable_and_normalised():
    out = bag_of_words(["Silk silk dress", None, "dress"])
    assert np.allclose(np.linalg.norm(out[0]), 1) and not out[1].any()
    assert np.array_equal(out, bag_of_words(["Silk silk dress", None, "dress"]))


def test_every_named_model_has_one_builder():
    assert list(BUILDERS) == list(MODELS)


@pytest.mark.parametrize("name", [m for m in MODELS if m not in NO_GRADIENT])
def test_every_model_scores_pairs_and_all_items(name):
    users, items = sides()
    model = build_model(users, items, ModelConfig(model=name, global_mean=3.5))
    scores = model(torch.tensor([0, 1, 6]), torch.tensor([0, 4, 5]))  # 6 and 5: the unknown rows
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert model.score_all(2).shape == (5,)
    loss = torch.nn.functional.mse_loss(scores, torch.tensor([4.0, 2.0, 3.0]))
    loss.backward()  # trainable end to end


# The id embedding tables each model names (rows: users + unknown, items + unknown): the only
# parameters id_l2 decays. Content models have none.
ID_TABLES = {"fusion": {(7, 32), (6, 32)}, "neumf": {(7, 32), (6, 32)}, "svd": {(7, 32), (6, 32)},
             "dnn": set(), "cnn": set(), "genre-pop": set(), "content-knn": set()}
# The codebooks' logit weights (3 books x 8 codes, from 8-d text and image embeddings): the only
# parameters the codebooks' prior (code_prior) decays. Only FusionNeuMF has codebooks (NeuMF is its id-only variant).
CODE_LOGITS = {"fusion": [(24, 8), (24, 8)]}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_optimiser_decays_exactly_the_id_embeddings_and_code_logits_the_model_names(name):
    from fusionrec.training.engine import make_optimizer

    users, items = sides()
    model = build_model(users, items, ModelConfig(model=name, embedding_dim=32, global_mean=3.5))
    cfg = TrainConfig(dataset="d", id_l2=0.03, code_prior=20.0)
    ids, codes, rest = make_optimizer(model, cfg, train_ratings=10_000).param_groups
    assert (ids["weight_decay"], codes["weight_decay"], rest["weight_decay"]) == (0.03, 0.002, 0.0)
    assert sorted(tuple(p.shape) for p in ids["params"]) == sorted(ID_TABLES[name])
    assert sorted(tuple(p.shape) for p in codes["params"]) == sorted(CODE_LOGITS.get(name, []))
    every = [id(p) for p in model.parameters()]
    assert sorted(every) == sorted(id(p) for p in ids["params"] + codes["params"] + rest["params"])  # each in one group


@pytest.mark.parametrize("name", list(MODELS))
def test_score_all_matches_pairwise_scores_and_new_users_score_from_content(name):
    users, items = sides()
    model = build_model(users, items, ModelConfig(model=name, global_mean=3.5)).eval()
    model.mark_seen(np.array([0, 1, 2]), np.array([0, 1, 2, 3]))  # item 4 unseen
    for user in (1, 4):  # seen, unseen
        pairwise = model(torch.full((5,), user), torch.arange(5))
        assert torch.allclose(model.score_all(user), pairwise, atol=1e-5)  # FusionNeuMF: the cached-tower path
    # a brand-new user given as content scores like an unseen known user with the same content
    row = model.users.row(text=users.text[4], image=users.image[4], structured=users.structured[4],
                          words=users.words[4])
    assert torch.allclose(model.score_all_for(row), model.score_all(4), atol=1e-5)
    model.train()
    assert model.score_all(1).shape == (5,)  # the training-mode path (no cache) still answers


@pytest.mark.parametrize("variant, ignored", [("no_text", "text"), ("no_image", "image"),
                                              ("no_structured", "structured"), ("id_only", "text")])
def test_variants_ignore_their_modality(variant, ignored):
    users, items = sides()
    model = build_model(users, items, ModelConfig(variant=variant)).eval()
    before = model(torch.arange(5), torch.arange(5))
    model.users.__getattr__(ignored).mul_(-3.0)
    assert torch.allclose(before, model(torch.arange(5), torch.arange(5)))


def test_full_model_uses_every_modality():
    users, items = sides()
    model = build_model(users, items, ModelConfig()).eval()
    for name in ("text", "image", "structured"):
        before = model(torch.arange(5), torch.arange(5))
        getattr(model.users, name).mul_(-3.0)
        assert not torch.allclose(before, model(torch.arange(5), torch.arange(5))), name
    assert set(VARIANTS) == {"full", "no_image", "no_text", "no_structured", "id_only"}


def test_unseen_users_get_the_unknown_id_but_keep_their_content():
    users, items = sides()
    model = build_model(users, items, ModelConfig(id_dropout=0.0)).eval()
    model.mark_seen(np.array([0, 1, 2]), np.arange(5))
    batch = model.users.gather(torch.tensor([0, 4, 6]))
    assert batch["ids"].tolist() == [0, 6, 6]  # user 4 had no training rating
    assert torch.equal(batch["text"][1], model.users.text[4])
    # two unseen users with different content score differently (content, not a shared random id)
    assert not torch.allclose(model(torch.tensor([4]), torch.tensor([0])), model(torch.tensor([5]), torch.tensor([0])))


def test_bundle_round_trip(tmp_path):
    users, items = sides()
    model = build_model(users, items, ModelConfig(model="fusion", variant="no_image")).eval()
    model.mark_seen(np.array([1, 2]), np.array([0, 3]))
    save_bundle(tmp_path / "b", model, users, items, {"objective": "rating"})
    loaded, meta = load_bundle(tmp_path / "b")
    pairs = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 3, 4])
    assert torch.allclose(model(*pairs), loaded(*pairs)) and meta["users"]["ids"][0] == "u0"


def test_standardised_content_ignores_the_embeddings_scale_and_survives_the_bundle(tmp_path):
    users, items = sides()
    users.image[2] = 0.0  # a user without a picture
    config = ModelConfig(standardise=True, content_dropout=0.5, id_dropout=0.0)
    model = build_model(users, items, config).eval()
    present = np.abs(users.image[:-1]).sum(1) > 0
    assert np.allclose(model.user_tower.image_mean.numpy(), users.image[:-1][present].mean(0), atol=1e-6)
    # the same weights over content shifted and rescaled per dimension give the same scores
    for side in (users, items):
        for name in ("text", "image"):
            matrix = getattr(side, name)
            has = np.abs(matrix).sum(1, keepdims=True) > 0
            setattr(side, name, np.where(has, matrix * np.arange(1, 9) + 3.0, 0.0).astype(np.float32))
    rescaled = build_model(users, items, config).eval()
    moments = ("_mean", "_scale")
    rescaled.load_state_dict({k: v for k, v in model.state_dict().items()
                              if not k.startswith(("users.", "items.")) and not k.endswith(moments)}, strict=False)
    pairs = torch.tensor([0, 2, 6, 3]), torch.tensor([0, 1, 5, 4])  # 6 and 5: the unknown rows
    assert torch.allclose(model(*pairs), rescaled(*pairs), atol=1e-4)
    save_bundle(tmp_path / "b", rescaled, users, items, {"objective": "rating"})
    assert torch.allclose(load_bundle(tmp_path / "b")[0](*pairs), rescaled(*pairs))
    rescaled.train()  # content dropout acts in training only
    assert not torch.allclose(rescaled(*pairs), rescaled(*pairs))


class FixedScores(torch.nn.Module):
    """A stand-in model with a fixed user x item score table, to check the ranking arithmetic."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)

    def score_all(self, user):
        return self.table[user]


def test_full_ranking_by_hand():
    # user 0 rated item 0 in training; test items {1, 3}; scores rank 0 (excluded), 3, 2, 1, 4.
    model = FixedScores([[9.0, 2.0, 3.0, 4.0, 1.0]])
    train = pd.DataFrame({"user_idx": [0], "item_idx": [0]})
    test = pd.DataFrame({"user_idx": [0, 0], "item_idx": [1, 3]})
    out = full_ranking(model, train, test, k=2)  # top 2 = [3, 2]: one hit at position 1
    assert out["hr@2"] == 1.0 and out["precision@2"] == 0.5 and out["recall@2"] == 0.5
    assert out["ndcg@2"] == pytest.approx(1.0 / (1.0 + 1.0 / np.log2(3)))
    assert out["map@2"] == pytest.approx((1.0 / 1) / 2)
    assert out["map_all@2"] == pytest.approx((1.0 / 1) / 2)  # 2 relevant items, min(2, 2) = 2 as well
    more = full_ranking(model, train, pd.DataFrame({"user_idx": [0] * 3, "item_idx": [1, 3, 4]}), k=2)
    assert more["map@2"] == pytest.approx(1.0 / 2) and more["map_all@2"] == pytest.approx(1.0 / 3)


def test_cnn_reads_raw_pixels(tiny_shop):
    from fusionrec.data.validate import load_dataset

    data = load_dataset(tiny_shop)
    users = build_side(data.users, data.spec.users, "users", None, tiny_shop)
    items = build_side(data.items, data.spec.items, "items", None, tiny_shop)
    assert items.pixels.shape == (41, 3 * 32 * 32) and items.pixels[:-1].max() > 0.5
    no_picture = data.users["image"].isna().to_numpy()
    assert not users.pixels[:-1][no_picture].any()  # missing picture -> zeros
    model = build_model(users, items, ModelConfig(model="cnn")).eval()
    before = model(torch.arange(5), torch.arange(5))
    model.items.pixels.mul_(0.0)
    assert not torch.allclose(before, model(torch.arange(5), torch.arange(5)))


def test_text_and_image_projections_are_shared_by_users_and_items():
    users, items = sides()
    model = build_model(users, items, ModelConfig(content_dropout=0.0, codebooks=0)).eval()
    assert model.user_tower.media["text"] is model.item_tower.media["text"]
    # a user and an item with the same text embedding land on the same projected vector
    items.text[0] = users.text[0]
    same = build_model(users, items, ModelConfig(standardise=False, codebooks=0)).eval()
    user_vector, _ = same.user_tower(same.users.gather(torch.tensor([0])))
    item_vector, _ = same.item_tower(same.items.gather(torch.tensor([0])))
    text = slice(same.config.embedding_dim, same.config.embedding_dim + same.config.content_dim)
    assert torch.allclose(user_vector[:, text], item_vector[:, text])


def test_a_modality_on_one_side_only_still_scores_and_unequal_widths_fail_clearly():
    users, items = sides()
    items.image = np.zeros((items.n + 1, 0), np.float32)  # items have no pictures
    model = build_model(users, items, ModelConfig())
    assert torch.isfinite(model(torch.tensor([0, 1]), torch.tensor([2, 5]))).all()
    users, items = sides()
    items.text = np.zeros((items.n + 1, 4), np.float32)
    with pytest.raises(ValueError, match="text embeddings differ in width"):
        build_model(users, items, ModelConfig())


def test_a_bundle_from_another_model_version_fails_in_one_line(tmp_path):
    users, items = sides()
    model = build_model(users, items, ModelConfig())
    save_bundle(tmp_path / "b", model, users, items, {"objective": "rating"})
    weights = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    weights["user_tower.to_gmf.weight"] = torch.zeros(1)  # a layer this version does not have
    torch.save(weights, tmp_path / "b" / "model.pt")
    with pytest.raises(ValueError, match="do not fit this version's fusion model .*train and register it again"):
        load_bundle(tmp_path / "b")


def test_feature_tables_the_dataset_needs_must_be_there(tmp_path):
    from fusionrec.encoders.pipeline import _write

    users = pd.DataFrame({"user_id": ["u0", "u1"], "bio": ["likes silk", None], "photo": [None, None]})
    spec = TableSpec("user_id", text="bio", image="photo")
    with pytest.raises(FileNotFoundError, match="no such features folder"):
        build_side(users, spec, "users", tmp_path / "nowhere")
    features = tmp_path / "features"
    features.mkdir()
    with pytest.raises(FileNotFoundError, match=r"users\.text\.parquet: no such feature table.*'bio'"):
        build_side(users, spec, "users", features)
    frame = pd.DataFrame({"id": ["u0", "u1"], "content_hash": ["h", ""], "mask": [1, 0],
                          "embedding": list(np.ones((2, 4), np.float32))})
    _write(features / "users.text.parquet", frame, 4, {"encoder": "e", "kind": "text", "dim": 4})
    side = build_side(users, spec, "users", features)  # no picture anywhere: no image table needed
    assert side.text.shape == (3, 4) and side.image.shape == (3, 0)
    assert side.text[:, 0].tolist() == [1.0, 0.0, 0.0]  # mask 0 and the unknown row stay zero


def test_only_fusion_has_variants():
    for model in ("svd", "neumf", "dnn", "cnn"):
        with pytest.raises(ValueError, match=f"only the fusion model has variants \\({model} has none\\)"):
            ModelConfig(model=model, variant="no_text").check()
        ModelConfig(model=model).check()
    ModelConfig(model="fusion", variant="no_text").check()


def test_a_bundle_with_a_config_this_version_does_not_know_fails_naming_it(tmp_path):
    import json

    users, items = sides()
    for model in ("fusion", "neumf"):  # neumf is saved as FusionNeuMF's id_only variant: it loads again
        save_bundle(tmp_path / model, build_model(users, items, ModelConfig(model=model)), users, items,
                    {"objective": "rating"})
        assert load_bundle(tmp_path / model)[0].config.model == model
    meta = json.loads((tmp_path / "fusion" / "bundle.json").read_text())
    meta["model_config"]["colour"] = "red"
    (tmp_path / "fusion" / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{tmp_path / 'fusion'}: .*a key this version does not know, 'colour'"):
        load_bundle(tmp_path / "fusion")


def test_codebooks_are_shared_soft_assignments_that_start_as_matches():
    users, items = sides()
    config = ModelConfig(codebooks=3, codebook_size=4, content_dropout=0.0, standardise=False)
    items.text[0] = users.text[0]  # a user and an item with the same text
    model = build_model(users, items, config).eval()
    codes = model.user_tower.media["text"]
    assert codes is model.item_tower.media["text"] and codes.out_features == 12
    user_vector, _ = model.user_tower(model.users.gather(torch.tensor([0, 1])))
    item_vector, _ = model.item_tower(model.items.gather(torch.tensor([0])))
    text = slice(config.embedding_dim, config.embedding_dim + 12)
    books = user_vector[:, text].view(2, 3, 4)
    assert (books >= 0).all() and torch.allclose(books.sum(-1), torch.ones(2, 3))  # one distribution per book
    assert torch.allclose(user_vector[:1, text], item_vector[:, text])  # same text, same codes
    # each code's GMF weight starts at 1 (text then image: 24 entries), so sharing a code starts as a match
    assert model.user_tower.out_dim == config.embedding_dim + 24 + config.content_dim
    assert torch.equal(model.out.weight[0, config.embedding_dim:config.embedding_dim + 24], torch.ones(24))
    # every row scores as pairwise and through the cached-tower path
    model.mark_seen(np.array([0, 1, 2]), np.array([0, 1, 2, 3]))
    for user in (1, 4):
        assert torch.allclose(model.score_all(user), model(torch.full((5,), user), torch.arange(5)), atol=1e-5)
    with pytest.raises(ValueError, match="codebook_size >= 2"):
        ModelConfig(codebooks=2, codebook_size=1).check()



@pytest.mark.parametrize("variant, books, without_user_images", [("full", 6, 3), ("no_text", 3, 0), ("id_only", 0, 0)])
def test_the_first_prediction_sits_at_the_training_mean(variant, books, without_user_images):
    # The codes' match weights start at 1, so near-uniform softmaxes add about 1 / size a book that
    # both sides have (6 books of 4 codes: 1.5 stars); the output bias starts that much lower.
    users, items = sides(n_users=40, n_items=30)
    config = ModelConfig(variant=variant, codebooks=3, codebook_size=4, global_mean=3.5)
    model = build_model(users, items, config).eval()
    assert model.expected_match() == books / 4
    with torch.no_grad():
        first = model(torch.arange(40).repeat_interleave(30), torch.arange(30).repeat(40))
    assert abs(float(first.mean()) - 3.5) < 0.25  # the MLP branch's random start adds a little
    # a side without a modality has all-zero codes there: nothing to centre for that modality
    users.image = np.zeros((users.n + 1, 0), np.float32)
    assert build_model(users, items, config).expected_match() == without_user_images / 4

def with_sentence_sets(side, size=3, seed=1):
    """`side` with its texts as sets of `size` 8-d sentence vectors: row k keeps 1 + k % size of
    them (the rest zero padding); the unknown row stays all zeros."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(side.n + 1, size, 8)).astype(np.float32)
    vectors[np.arange(size)[None, :] > (np.arange(side.n + 1) % size)[:, None]] = 0.0
    vectors[-1] = 0.0
    side.text, side.text_set = vectors.reshape(side.n + 1, size * 8), size
    return side


def test_set_pooling_starts_as_the_mean_of_the_present_vectors_and_padding_is_safe():
    users = with_sentence_sets(sides()[0])
    sets = torch.from_numpy(users.text).view(-1, 3, 8)
    pooled = SetPooling(8, heads=2)(sets)  # [7, 2, 8]
    mean = set_mean(torch.from_numpy(users.text), 3)
    assert torch.allclose(pooled, mean[:, None].expand(-1, 2, -1), atol=1e-6)  # padding is not averaged in
    assert not pooled[-1].any()  # a row with no vectors (the unknown row) pools to zeros
    assert torch.allclose(mean[1], sets[1, :2].mean(0)) and torch.equal(mean[0], sets[0, 0])
    pooled.sum().backward()  # the all-padding row gives finite gradients, not NaN
    pool = SetPooling(8, heads=2)
    pool(sets).pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in pool.parameters())


def test_set_pooling_learns_to_read_the_sentence_that_carries_the_signal():
    # Each set: 4 vectors; the one whose first entry is +3 carries the target (a fixed direction of
    # its other entries); the rest are noise with first entry -3. The mean blurs the signal by 4x.
    torch.manual_seed(0)
    sets = torch.randn(512, 4, 8)
    sets[:, :, 0] = -3.0
    which = torch.randint(0, 4, (512,))
    sets[torch.arange(512), which, 0] = 3.0
    target = sets[torch.arange(512), which, 1:] @ torch.linspace(-1, 1, 7)
    pool, head = SetPooling(8, heads=1), torch.nn.Linear(8, 1)
    optimiser = torch.optim.Adam([*pool.parameters(), *head.parameters()], lr=0.05)
    for _ in range(300):
        optimiser.zero_grad()
        loss = torch.nn.functional.mse_loss(head(pool(sets)[:, 0]).squeeze(-1), target)
        loss.backward()
        optimiser.step()
    weights = torch.softmax(pool.scores(sets * pool.input_scale), dim=1)[..., 0]  # [512, 4]
    assert weights[torch.arange(512), which].mean() > 0.9  # it attends to the carrying vector
    assert loss < 0.01 * target.var()


def test_each_codebook_reads_its_own_attention_head():
    books = Codebooks(8, [], books=3, size=4)
    heads = torch.randn(5, 3, 8)  # SetPooling's output: one pooled vector per book
    each = torch.stack([books(heads[:, b]).view(5, 3, 4)[:, b] for b in range(3)], dim=1)  # book b of head b
    assert torch.allclose(books(heads), each.flatten(1), atol=1e-6)


@pytest.mark.parametrize("codebooks", [3, 0])
def test_a_model_over_sentence_sets_scores_serves_and_saves(tmp_path, codebooks):
    users, items = sides()
    users, items = with_sentence_sets(users), with_sentence_sets(items, seed=2)
    model = build_model(users, items, ModelConfig(codebooks=codebooks, global_mean=3.5))
    pool = model.user_tower.media["text"].pool
    assert pool is model.item_tower.media["text"].pool and pool.scores.out_features == (codebooks or 1)
    scores = model(torch.tensor([0, 1, 6]), torch.tensor([0, 4, 5]))
    torch.nn.functional.mse_loss(scores, torch.tensor([4.0, 2.0, 3.0])).backward()
    assert pool.scores.weight.grad.abs().sum() > 0  # the attention trains with the model
    model.eval().mark_seen(np.array([0, 1, 2]), np.array([0, 1, 2, 3]))
    for user in (1, 4):
        assert torch.allclose(model.score_all(user), model(torch.full((5,), user), torch.arange(5)), atol=1e-5)
    # a new user given as a set (what the service encodes) scores like the unseen user with that set
    row = model.users.row(text=users.text[4], image=users.image[4], structured=users.structured[4],
                          words=users.words[4])
    assert torch.allclose(model.score_all_for(row), model.score_all(4), atol=1e-5)
    save_bundle(tmp_path / "b", model, users, items, {"objective": "rating"})
    loaded, meta = load_bundle(tmp_path / "b")
    assert meta["users"]["text_set"] == 3 and torch.allclose(loaded.score_all(4), model.score_all(4), atol=1e-6)
    users.text_set = 1  # users' texts read as single vectors, items' as sets: one encoder, one chunking
    with pytest.raises(ValueError, match="differ in width or set size"):
        build_model(users, items, ModelConfig())


def test_content_knn_reads_a_set_as_the_mean_of_its_vectors():
    users, items = sides()
    items = with_sentence_sets(items)
    knn = build_model(users, items, ModelConfig(model="content-knn"))
    items_mean = sides()[1]
    items_mean.text = set_mean(torch.from_numpy(items.text), 3).numpy()
    plain = build_model(users, items_mean, ModelConfig(model="content-knn"))
    for model in (knn, plain):
        model.mark_seen(np.array([0, 0, 1]), np.array([0, 1, 2]))
        model.fit_ratings(np.array([0, 0, 1]), np.array([0, 1, 2]))
    assert torch.allclose(knn.score_all(0), plain.score_all(0)) and knn.score_all(0).abs().sum() > 0


def test_id_dropout_follows_how_often_an_id_was_seen_in_training():
    users, items = sides(n_users=6)
    model = build_model(users, items, ModelConfig(id_dropout=0.2, content_dropout=0.0)).train()
    # user 0 rated 8 items, users 1-3 two each (the median of the rated), user 4 one, user 5 none
    model.mark_seen(np.array([0] * 8 + [1, 1, 2, 2, 3, 3, 4]), np.zeros(15, dtype=int))
    rate = model.user_tower.id_dropout_rate
    assert torch.allclose(rate, torch.tensor([0.05, 0.2, 0.2, 0.2, 0.4, 0.0, 0.0]))  # last: the unknown row
    # the rates are what forward draws with: user 0 keeps its id ~95 % of the time, user 4 ~60 %
    kept = [(model.user_tower(model.users.gather(torch.full((4000,), u)))[0][:, :32]
             == model.user_tower.ids.weight[u]).all(1).float().mean().item() for u in (0, 4)]
    assert abs(kept[0] - 0.95) < 0.02 and abs(kept[1] - 0.6) < 0.03
    rare = build_model(users, items, ModelConfig(id_dropout=0.2))
    rare.mark_seen(np.array([0] * 40 + [1] * 20 + [2]), np.zeros(61, dtype=int))  # median 20: user 2 capped
    assert rare.user_tower.id_dropout_rate[2].item() == pytest.approx(0.5)
    flat = build_model(users, items, ModelConfig(id_dropout=0.2, id_dropout_by_count=False))
    flat.mark_seen(np.array([0] * 8 + [1, 1, 2, 2, 3, 3, 4]), np.zeros(15, dtype=int))
    assert torch.allclose(flat.user_tower.id_dropout_rate, torch.full((7,), 0.2))


def test_weight_average_warms_up_then_decays_and_is_what_validation_sees():
    from fusionrec.training.engine import WeightAverage

    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    averaged = WeightAverage(layer, decay=0.2)
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        with torch.no_grad():
            layer.weight.fill_(value)
        averaged.update()
        expected += (1 - min(0.2, (1 + step) / (10 + step))) * (value - expected)  # warm-up at step 1 only
    with averaged.applied():
        assert layer.weight.item() == pytest.approx(expected) != 4.0
    assert layer.weight.item() == 4.0  # the trained weights are back after validation
    resumed = WeightAverage(layer, decay=0.2)
    resumed.load_state_dict(averaged.state_dict())
    with resumed.applied():
        assert resumed.steps == 4 and layer.weight.item() == pytest.approx(expected)
