"""Two-stage ranking (serve/candidates.py): the inner-product decomposition, the index, and the
Ranker's use of it above its catalogue-size threshold only. Tiny untrained models, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionrec.models.bundle import load_bundle
from fusionrec.serve import candidates
from fusionrec.serve.candidates import CandidateIndex, item_keys, user_query
from fusionrec.serve.ranker import Ranker


@pytest.fixture(scope="module")
def bundles(tiny_shop, random_features, served_bundles, tmp_path_factory) -> dict:
    """fusion and svd (tiny BERT/DINOv2 features), neumf (ids only) and dnn (no inner-product part)."""
    from conftest import _make_bundle

    made = {name: _make_bundle(tiny_shop, random_features, tmp_path_factory.mktemp(name), model=name)[0]
            for name in ("neumf", "dnn")}
    return {"fusion": served_bundles["fusion"], "svd": served_bundles["svd"], **made}


def randomised(folder):
    """The bundle's model with every parameter redrawn (biases included), so no term is zero."""
    model, _ = load_bundle(folder)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model


@pytest.mark.parametrize("name", ["fusion", "neumf", "svd"])
def test_the_inner_product_is_the_gmf_half_plus_the_item_bias(bundles, name):
    model = randomised(bundles[name])
    keys = item_keys(model)  # [n, d + 1]
    for row in (0, 7):
        user = model.users.gather(torch.tensor([row]))
        full = model.score_all_for(user).numpy()  # [n]
        product = keys @ user_query(model, user)  # [n]
        # what the product leaves out is the same for every item (svd), or the MLP half too (NeuMF)
        assert not np.allclose(product, full, atol=1e-3)
    with torch.no_grad():  # the model with its MLP half, user bias and constant silenced
        if name == "svd":
            model.mu.zero_()
            model.b_u.weight.zero_()
        else:
            model.out.weight[0, model.user_tower.out_dim:] = 0
            model.out.bias.zero_()
            model.user_tower.bias.weight.zero_()
            model.load_state_dict(model.state_dict())  # drops the cached item towers
    keys = item_keys(model)
    for row in (0, 7):
        user = model.users.gather(torch.tensor([row]))
        assert np.allclose(keys @ user_query(model, user), model.score_all_for(user).numpy(), atol=1e-5)
    new_user = model.users.row(structured=np.ones(model.users.structured.shape[1], np.float32))
    assert np.allclose(keys @ user_query(model, new_user), model.score_all_for(new_user).numpy(), atol=1e-5)


def test_models_without_an_inner_product_part_get_no_index(bundles):
    model, _ = load_bundle(bundles["dnn"])
    assert item_keys(model) is None and CandidateIndex.for_model(model) is None
    ranker = Ranker(str(bundles["dnn"]), candidates_above=0)
    assert ranker.current.index is None
    assert len(ranker.recommend("u00001", 5)["items"]) == 5


@pytest.mark.parametrize("name", ["fusion", "svd"])
def test_scoring_a_subset_of_items_agrees_with_scoring_all(bundles, name):
    model = randomised(bundles[name]).eval()
    user = model.users.gather(torch.tensor([3]))
    rows = torch.tensor([31, 0, 5, 17, 5])
    assert np.allclose(model.score_items_for(user, rows).numpy(), model.score_all_for(user).numpy()[rows], atol=1e-6)
    def pairwise() -> np.ndarray:  # score(): no cached towers
        return model(torch.full((len(rows),), 3), rows).detach().numpy()

    seen = pairwise()
    assert np.allclose(model.score_items(3, rows).numpy(), seen, atol=1e-5)
    assert np.allclose(model.score_all(3).numpy()[rows], seen, atol=1e-5)
    model.mark_seen(np.array([0]), np.arange(model.items.n))  # user 3 unseen now: scored as the unknown user
    assert np.allclose(model.score_all(3).numpy()[rows], pairwise(), atol=1e-5)
    assert not np.allclose(model.score_all(3).numpy()[rows], seen, atol=1e-3)


@pytest.mark.parametrize("name", ["fusion", "neumf", "svd"])
def test_two_stage_with_every_item_as_a_candidate_is_exact_ranking(bundles, name):
    exact = Ranker(str(bundles[name]))
    assert exact.current.index is None  # 40 items: below the default threshold
    two_stage = Ranker(str(bundles[name]), candidates_above=0, candidates=40)
    assert two_stage.current.index is not None and two_stage.current.index.n == 40
    for m in (exact.current, two_stage.current):  # the same (random, so nonzero) weights in both
        torch.manual_seed(1)
        with torch.no_grad():
            for p in m.model.parameters():
                p.normal_(std=0.3)
        m.model.load_state_dict(m.model.state_dict())
    two_stage.current.index = CandidateIndex.for_model(two_stage.current.model)
    for user in ("u00001", "u00002", "u00030"):
        for exclude_seen in (True, False):
            assert two_stage.recommend(user, 40, exclude_seen) == exact.recommend(user, 40, exclude_seen)
        assert two_stage.recommend(user, 3) == exact.recommend(user, 3)
    if name == "fusion":  # a new user, from attributes
        call = {"k": 40, "encoders": exact.current.user_encoders(), "vectors": {}, "attributes": {"age": 30}}
        assert two_stage.recommend_new(**call) == exact.recommend_new(**call)


def test_fewer_candidates_rank_the_index_s_proposals_with_the_model_s_scores(bundles):
    ranker = Ranker(str(bundles["fusion"]), candidates_above=0, candidates=10)
    exact = Ranker(str(bundles["fusion"]))
    m = ranker.current
    user = m.users["u00001"]
    seen = set(m.item_ids[m.seen[user]])
    out = ranker.recommend("u00001", 5)["items"]
    assert len(out) == 5 and not seen & {i["item_id"] for i in out}
    out = ranker.recommend("u00001", 20)["items"]  # k > N: k proposals (plus as many as the user has seen)
    assert len(out) == 20 and not seen & {i["item_id"] for i in out}
    ranker.candidates = 1
    out = ranker.recommend("u00001", 1)["items"]  # N proposals plus the seen: never fewer than N new items
    assert len(out) == 1 and out[0]["item_id"] not in seen
    ranker.candidates = 10
    out = ranker.recommend("u00001", 40)["items"]
    assert 10 <= len(out) <= 40 - len(seen) and not seen & {i["item_id"] for i in out}
    scores = {i["item_id"]: i["score"] for i in exact.recommend("u00001", 40, exclude_seen=False)["items"]}
    assert all(abs(i["score"] - scores[i["item_id"]]) < 1e-5 for i in out)
    assert [i["score"] for i in out] == sorted((i["score"] for i in out), reverse=True)


def test_below_the_threshold_the_index_is_neither_built_nor_searched(bundles, monkeypatch):
    calls = []
    original = CandidateIndex.search
    monkeypatch.setattr(CandidateIndex, "search", lambda self, *a: calls.append(a) or original(self, *a))
    for above in (40, 1000):  # 40 items: not above 40
        ranker = Ranker(str(bundles["fusion"]), candidates_above=above)
        assert ranker.current.index is None
        ranker.recommend("u00001", 5)
        ranker.recommend_new(5, ranker.current.user_encoders(), {}, attributes={"age": 30})
        assert ranker.refresh() is False and calls == []
    ranker = Ranker(str(bundles["fusion"]), candidates_above=39)
    ranker.recommend("u00001", 5)
    ranker.recommend_new(5, ranker.current.user_encoders(), {}, attributes={"age": 30})
    assert len(calls) == 2
    with pytest.raises(ValueError, match="candidates"):
        Ranker(str(bundles["fusion"]), candidates=0)


def test_the_ivf_index_finds_the_largest_inner_products():
    """Scanning every list, the lifted IVF is exact; scanning its share, it finds most of the top 50
    on keys that cluster (as trained embeddings do; isotropic noise is its worst case)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 9)) * 2
    keys = (centres[rng.integers(0, 30, 3000)] + rng.normal(size=(3000, 9)) * 0.5).astype(np.float32)
    keys *= rng.uniform(0.2, 2, size=(3000, 1)).astype(np.float32)  # norms vary: inner product is not L2
    flat, ivf = CandidateIndex(keys), CandidateIndex(keys, flat_up_to=0)
    assert flat.exact and not ivf.exact and ivf.index.nlist == 55
    assert (ivf.probes(10), ivf.probes(50), ivf.probes(500)) == (6, 10, 55)  # 1/8 of the lists, 10 keys a candidate
    recalls = []
    for query in rng.normal(size=(20, 9)).astype(np.float32):
        truth = np.sort(np.argsort(-(keys @ query), kind="stable")[:50])
        assert np.array_equal(flat.search(query, 50), truth)
        found = ivf.search(query, 50)
        assert np.all(np.diff(found) > 0)
        recalls.append(len(np.intersect1d(found, truth)) / 50)
        assert set(truth) <= set(ivf.search(query, 500))  # 500 candidates: every list scanned, so exact
    assert np.mean(recalls) >= 0.9, recalls
    assert len(flat.search(keys[0], 5000)) == 3000 and candidates.FLAT_UP_TO > 0
