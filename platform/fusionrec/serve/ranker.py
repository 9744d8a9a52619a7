"""The ranker: one loaded model answering predict, recommend and recommend-for-a-new-user.

Plain Python, no Ray: the Serve deployment (serve/app.py) and the one-process app
(`fusionrec serve --plain`) both wrap it. `answer(call)` returns a value for every call, never
raises: `{"status": 200, "body": ...}` or `{"status": 4xx, "error": "field: message"}`, so one bad
request in a Serve batch cannot fail the others.

A ranker built on an alias (models:/fusionrec@champion) follows it: `refresh()` loads the version
the alias points at now and swaps it in with one assignment, so requests already running finish
on the old model and none fail.

Large catalogues are ranked in two stages (serve/candidates.py): above `candidates_above` items a
model with an inner-product part (FusionNeuMF, NeuMF, svd) gets a faiss index when it loads, which
proposes `candidates` items (plus the user's seen ones, left out after) that the full model
re-ranks. At or below that size, and for every other model, every item is scored.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import torch

from fusionrec import registry
from fusionrec.evaluate import predict, top_k
from fusionrec.models.bundle import load_bundle, load_seen
from fusionrec.models.content import StructuredEncoder, bag_of_words, image_pixels, row_index
from fusionrec.models.nets import Recommender
from fusionrec.serve.candidates import CandidateIndex, user_query

log = logging.getLogger(__name__)
STALE = 409  # the model changed between encoding a payload and ranking it: encode again
# A new user's number may lie this many standard deviations from the training data's mean, no
# further: beyond it the standardised value, and the scores, stop meaning anything (or overflow).
MAX_STANDARD_SCORES = 100.0
# Two-stage ranking (serve/candidates.py) above this many items; exact full ranking at or below it.
CANDIDATES_ABOVE = 50_000
# Candidates the full model re-ranks: recall@100 against exact ranking >= 0.95 at this N on the
# synthetic shop and MovieLens-100K models (benchmarks/retrieval.py).
CANDIDATES = 1000


class Rejected(Exception):
    """A request that cannot be answered; `status` is the HTTP status, the message names the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class LoadedModel:
    ref: registry.ModelRef
    model: Recommender
    meta: dict
    users: dict[str, int]  # user id -> row
    items: dict[str, int]
    item_ids: np.ndarray
    seen: list[np.ndarray]  # per user row: item rows rated in training
    metrics: dict[str, float]
    index: CandidateIndex | None = None  # the candidate stage; None: every item is scored

    @classmethod
    def load(cls, ref: registry.ModelRef, candidates_above: int = CANDIDATES_ABOVE) -> LoadedModel:
        """The model at `ref`, with a candidate index if it has more than `candidates_above` items."""
        with registry.local_bundle(ref.uri) as folder:
            model, meta = load_bundle(folder)
            seen = load_seen(folder, len(meta["users"]["ids"]))
        loaded = cls(ref, model, meta, row_index(meta["users"]["ids"]), row_index(meta["items"]["ids"]),
                     np.array(meta["items"]["ids"], dtype=object),
                     seen, registry.run_metrics(ref.run_id))
        model.score_all(0)  # warm up (FusionNeuMF caches both sides' towers here)
        if len(loaded.items) > candidates_above:
            loaded.index = CandidateIndex.for_model(model)  # None for a model without an inner-product part
        return loaded

    @property
    def scale(self) -> tuple[float, float] | None:
        return tuple(self.meta["rating_scale"]) if self.meta["objective"] == "rating" else None

    @cached_property  # read for every new user and /model: built once per loaded model
    def attributes(self) -> StructuredEncoder:
        return StructuredEncoder.from_dict(self.meta["users"]["structured"])

    def user_encoders(self) -> dict[str, dict | None]:
        """The text/image encoder each user-side content column was made with (None: not used)."""
        encoders = self.meta.get("encoders", {})
        return {kind: encoders.get(f"users.{kind}") if getattr(self.model.users, kind).shape[1] else None
                for kind in ("text", "image")}

    def user_row(self, user_id: str) -> int:
        if user_id not in self.users:
            raise Rejected(404, f"user_id: unknown user {user_id!r} (describe a new user with `user` instead)")
        return self.users[user_id]

    def top(self, scores: np.ndarray, k: int, rows: np.ndarray | None = None) -> dict:
        """Ranked by the raw score; each item's rating is that score on the dataset's scale (clipped
        to it, as /predict answers), None under the implicit objective (scores are logits there).
        `scores` are every item's, or with `rows`, those item rows' only."""
        top = top_k(scores, min(k, int(np.isfinite(scores).sum())))  # never an excluded (-inf) item
        ratings = np.clip(scores[top], *self.scale) if self.scale else [None] * len(top)
        items = self.item_ids[top if rows is None else rows[top]]
        return {"items": [{"item_id": str(item), "score": float(scores[i]),
                           "rating": None if rating is None else float(rating)}
                          for item, i, rating in zip(items, top, ratings, strict=True)],
                "model_version": self.ref.version}

    def two_stage(self, user: int | dict[str, torch.Tensor], k: int, candidates: int, seen: np.ndarray) -> dict:
        """The top k of `candidates` items (k if more) from the index, not in `seen`, re-ranked by
        the model; `user` a known user's row or a new user's gathered row. The seen items among the
        proposals are scored too, then left out, as in exact ranking: once every item is proposed,
        the model does the very computation of ranking them all."""
        model = self.model
        known = isinstance(user, int)
        gathered = model.users.gather(torch.tensor([user], device=model.device)) if known else user
        wanted = max(candidates, k) + len(seen)
        rows = self.index.search(user_query(model, gathered), wanted)  # [<= wanted] item rows, ascending
        rows_t = torch.as_tensor(rows, device=model.device)
        scores = model.score_items(user, rows_t) if known else model.score_items_for(user, rows_t)  # [len(rows)]
        scores = finite(scores.cpu().numpy().astype(np.float64))
        scores[np.isin(rows, seen)] = -np.inf
        return self.top(scores, k, rows)


def finite(scores: np.ndarray) -> np.ndarray:
    """The model's scores, if all are finite. Inputs are bounded, so a NaN or infinity here is the
    model's fault: an error, never a shorter list or a NaN in an answer."""
    if not np.isfinite(scores).all():
        raise Rejected(500, "model: produced a non-finite score; the served model is broken")
    return scores


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def attribute_row(encoder: StructuredEncoder, attributes: dict) -> np.ndarray:
    """A new user's attributes as the model's structured vector; unknown names or values, and
    numbers that are not finite or far outside the training data, are rejected."""
    for name, value in attributes.items():
        field = f"user.attributes.{name}"
        if value is None:  # stated as unknown: treated like a missing cell
            continue
        if name in encoder.categorical:
            if not isinstance(value, str | int | float) or str(value) not in encoder.categorical[name]:
                known = ", ".join(encoder.categorical[name][:20])
                raise Rejected(422, f"{field}: unknown value {_shown(value)} (known: {known})")
        elif name in encoder.numeric:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Rejected(422, f"{field}: expected a finite number, got {_shown(value)}")
            mean, std = encoder.numeric[name]
            low, high = mean - MAX_STANDARD_SCORES * std, mean + MAX_STANDARD_SCORES * std
            if not low <= value <= high:  # exact for ints of any size; false for NaN
                raise Rejected(422, f"{field}: {_shown(value)} is out of range: expected a finite number from "
                                    f"{low:.6g} to {high:.6g} ({MAX_STANDARD_SCORES:g} standard deviations "
                                    "around the training data's mean)")
        else:
            known = ", ".join([*encoder.categorical, *encoder.numeric]) or "none"
            raise Rejected(422, f"{field}: unknown attribute (this model knows: {known})")
    columns = [*encoder.categorical, *encoder.numeric]
    frame = pd.DataFrame([{c: attributes.get(c) for c in columns}], columns=columns, dtype=object)
    return encoder.transform(frame)[0]


def ranking_settings(args: dict) -> dict[str, int]:
    """The application args' two-stage settings, checked: {"candidates_above": .., "candidates": ..}."""
    settings = {"candidates_above": args.get("candidates_above", CANDIDATES_ABOVE),
                "candidates": args.get("candidates", CANDIDATES)}
    for key, least in (("candidates_above", 0), ("candidates", 1)):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{key}: expected a whole number >= {least}, got {value!r}")
    return settings


class Ranker:
    def __init__(self, model_uri: str, refresh_s: float = 5.0, candidates_above: int = CANDIDATES_ABOVE,
                 candidates: int = CANDIDATES):
        """`candidates_above`: rank in two stages above this many items (0: always, where the model
        allows); `candidates`: how many items the index proposes for the model to re-rank."""
        ranking_settings({"candidates_above": candidates_above, "candidates": candidates})
        self.model_uri = model_uri
        self.refresh_s = refresh_s
        self.candidates_above, self.candidates = candidates_above, candidates
        self.current = LoadedModel.load(registry.resolve(model_uri), candidates_above)

    def refresh(self) -> bool:
        """Follow the alias: load the version it points at now, if that changed. True if swapped."""
        ref = registry.resolve(self.model_uri)
        if ref.version == self.current.ref.version:
            return False
        loaded = LoadedModel.load(ref, self.candidates_above)
        self.current = loaded  # one assignment: calls already running keep the model they started with
        log.info("now serving %s version %s", ref.name, ref.version)
        return True

    def follow_alias(self) -> None:
        """Check the alias every refresh_s seconds in a background thread (no-op for a fixed version)."""
        if self.current.ref.alias is None or self.refresh_s <= 0:
            return

        def loop() -> None:
            while True:
                time.sleep(self.refresh_s)
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - keep serving the current model; try again later
                    log.exception("could not refresh %s", self.model_uri)

        threading.Thread(target=loop, name="fusionrec-follow-alias", daemon=True).start()

    def answer(self, call: dict) -> dict:
        """Dispatch one call {"method": ..., **arguments}; always returns a status and a body or an error."""
        methods = {"predict": self.predict, "recommend": self.recommend, "recommend_new": self.recommend_new}
        try:
            arguments = {name: value for name, value in call.items() if name != "method"}
            return {"status": 200, "body": methods[call["method"]](**arguments)}
        except Rejected as exc:
            return {"status": exc.status, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a bug must not take the batch down with it
            log.exception("ranker failed on %s", call)
            return {"status": 500, "error": f"internal error: {type(exc).__name__}"}

    def predict(self, user_id: str, item_ids: list[str]) -> dict:
        m = self.current
        user = m.user_row(user_id)
        rows = np.array([m.items.get(i, -1) for i in item_ids])
        if (rows < 0).any():
            first = int(np.argmax(rows < 0))
            raise Rejected(404, f"item_ids[{first}]: unknown item {item_ids[first]!r}")
        ratings = finite(predict(m.model, np.full(len(rows), user), rows, m.scale))
        return {"predictions": [{"item_id": i, "rating": float(r)} for i, r in zip(item_ids, ratings, strict=True)],
                "model_version": m.ref.version}

    def recommend(self, user_id: str, k: int, exclude_seen: bool = True) -> dict:
        m = self.current
        user = m.user_row(user_id)
        if m.index is not None:
            return m.two_stage(user, k, self.candidates, m.seen[user] if exclude_seen else np.zeros(0, np.int64))
        scores = finite(m.model.score_all(user).numpy().astype(np.float64))
        if exclude_seen:
            scores[m.seen[user]] = -np.inf
        return m.top(scores, k)

    def recommend_new(self, k: int, encoders: dict, vectors: dict, text: str | None = None,
                      image: bytes | None = None, attributes: dict | None = None) -> dict:
        """Rank for a user never seen: content encoded with `encoders` (stale if the model moved on)."""
        m = self.current
        if encoders != m.user_encoders():
            raise Rejected(STALE, "model: changed while the request was being encoded; send it again")
        content = {"structured": attribute_row(m.attributes, attributes or {})}
        content.update({kind: vector for kind, vector in vectors.items() if vector is not None})
        users = m.model.users
        if text is not None and users.words.shape[1]:
            content["words"] = bag_of_words([text])[0]
        if image is not None and users.pixels.shape[1]:
            from fusionrec.data.images import open_image

            content["pixels"] = image_pixels(open_image(io.BytesIO(image)))
        user = users.row(**content)
        if m.index is not None:
            return m.two_stage(user, k, self.candidates, np.zeros(0, np.int64))
        with torch.no_grad():
            scores = finite(m.model.score_all_for(user).numpy().astype(np.float64))
        return m.top(scores, k)

    def info(self) -> dict:
        m = self.current
        config = m.meta["model_config"]
        encoder = m.attributes
        return {"name": m.ref.name, "version": m.ref.version, "alias": m.ref.alias, "run_id": m.ref.run_id,
                "model": config["model"], "variant": config["variant"], "objective": m.meta["objective"],
                "dataset": m.meta.get("dataset"), "users": len(m.users), "items": len(m.items),
                "training_metrics": m.metrics, "test_metrics": m.meta.get("test_metrics"),
                "user_encoders": m.user_encoders(),
                "attributes": {"categorical": encoder.categorical, "numeric": list(encoder.numeric)}}
