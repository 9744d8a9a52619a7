"""The synthetic shop: a dress shop whose ratings come from a hidden preference model.

    latent(u, i) = mean + bias(u, i) + text(u, i) + image(u, i) + structured(u, i)
    rating       = clip(round(latent + noise), 1, 5),   noise ~ N(0, noise_sd^2)

- text(u, i): the user's taste for the item's fabric, vibe and occasion. Items describe these
  only in their description; users state their favourites in their self-introduction.
- image(u, i): taste for the item's style, colour and pattern, shown only in the product photo;
  a user's profile picture shows them in their favourite dress.
- structured(u, i): fixed affinities between user columns (age, region, years registered) and
  item columns (age range, sleeve, brand, price band).
- bias(u, i): user and item biases, learnable from ratings (IDs) only.

Each term is scaled so its variance over the ratings is its share of the signal variance (text
the largest, as the paper found). Tastes have a favourite level plus a small idiosyncratic part
that only a user's ratings reveal. `dataset.yaml` records the truth, including the Bayes floor:
the expected MSE of the best possible predictor E[rating | latent], the least test MSE any model
can reach.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import ndtr

from fusionrec.data.io import atomic_directory
from fusionrec.data.schema import DatasetSpec, TableSpec
from fusionrec.data.shop_images import Picture, render_all
from fusionrec.data.shop_vocab import (
    AGE_RANGES,
    BRANDS,
    COLOURS,
    FABRICS,
    GENDER_WEIGHTS,
    GENDERS,
    HOBBIES,
    ITEM_FILLERS,
    ITEM_TEMPLATES,
    JOBS,
    LENGTHS,
    OCCASIONS,
    PATTERNS,
    PRICE_BANDS,
    PRICE_BASE,
    REGIONS,
    SIZES,
    SLEEVES,
    STYLES,
    USER_FACTOR_SENTENCES,
    USER_FILLERS,
    USER_OPENERS,
    VIBES,
)

RATING_MIN, RATING_MAX = 1, 5
SHARES = {"text": 0.40, "image": 0.25, "structured": 0.20, "bias": 0.15}
SIGNAL_VARIANCE = 1.0
NOISE_SD = 0.6
MEAN = 3.6
FAVOURITE_WEIGHT, IDIOSYNCRATIC_SD = 1.0, 0.1
UNSTATED = 0.05  # chance that a self-introduction leaves out one of the user's text favourites
NO_PICTURE = 0.05  # chance that a user has no profile picture
TEXT_FACTORS = {"fabric": FABRICS, "vibe": VIBES, "occasion": OCCASIONS}
IMAGE_FACTORS = {"style": STYLES, "colour": list(COLOURS), "pattern": PATTERNS}


@dataclass(frozen=True)
class SynthConfig:
    users: int = 500
    items: int = 300
    density: float = 0.05
    seed: int = 0
    image_size: int = 128
    images: bool = True

    def check(self) -> None:
        if self.users < 1 or self.items < 1:
            raise ValueError("--users and --items must be at least 1")
        if not 0 < self.density <= 1:
            raise ValueError(f"--density must be in (0, 1], got {self.density}")
        if self.n_ratings < 1:
            raise ValueError("users x items x density rounds to zero ratings: raise --density")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"--image-size must be between 16 and 1024 pixels, got {self.image_size}")

    @property
    def n_ratings(self) -> int:
        return int(round(self.users * self.items * self.density))


def entity_ids(prefix: str, n: int) -> np.ndarray:
    width = max(5, len(str(n)))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(1, n + 1)], dtype=object)


def _sample_pairs(cfg: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user, item) pairs; active users and popular items rate more (log-normal weights)."""
    n = cfg.n_ratings
    if cfg.density > 0.25:  # dense: plain sampling without replacement is cheap and always terminates
        flat = np.sort(rng.choice(cfg.users * cfg.items, size=n, replace=False))
        return flat // cfg.items, flat % cfg.items
    activity = rng.lognormal(0.0, 0.6, cfg.users)
    popularity = rng.lognormal(0.0, 0.8, cfg.items)
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < n:
        draw = 2 * (n - len(chosen)) + 64
        u = rng.choice(cfg.users, size=draw, p=activity / activity.sum())
        i = rng.choice(cfg.items, size=draw, p=popularity / popularity.sum())
        candidates = np.concatenate([chosen, u.astype(np.int64) * cfg.items + i])
        _, first = np.unique(candidates, return_index=True)
        chosen = candidates[np.sort(first)][:n]  # keep draw order, so the result only depends on the seed
    chosen = np.sort(chosen)
    return chosen // cfg.items, chosen % cfg.items


def _tastes(n_users: int, levels: int, favourite: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[n_users, levels] taste: FAVOURITE_WEIGHT at the favourite level plus idiosyncratic noise."""
    taste = rng.normal(0.0, IDIOSYNCRATIC_SD, (n_users, levels))
    taste[np.arange(n_users), favourite] += FAVOURITE_WEIGHT
    return taste


def _standardise(values: np.ndarray, share: float) -> np.ndarray:
    std = values.std()
    centred = values - values.mean()
    return centred * (np.sqrt(share * SIGNAL_VARIANCE) / std) if std > 0 else centred


def _bayes_floor(latent: np.ndarray) -> tuple[float, np.ndarray]:
    """Expected squared error of the best predictor E[rating | latent], and that predictor."""
    stars = np.arange(RATING_MIN, RATING_MAX + 1, dtype=float)
    upper = np.append(stars[:-1] + 0.5, np.inf)
    lower = np.insert(stars[1:] - 0.5, 0, -np.inf)
    z = latent[:, None]
    prob = ndtr((upper - z) / NOISE_SD) - ndtr((lower - z) / NOISE_SD)  # [n, stars]
    expected = prob @ stars
    variance = prob @ stars**2 - expected**2
    return float(variance.mean()), expected


def _phrase(rng: np.random.Generator, variants: dict[str, list[str]], level: str) -> str:
    options = variants[level]
    return options[int(rng.integers(len(options)))]


def _item_texts(items: dict[str, np.ndarray], rng: np.random.Generator) -> list[str]:
    texts = []
    fabrics, vibes, occasions = list(FABRICS), list(VIBES), list(OCCASIONS)
    for f, v, o in zip(items["fabric"], items["vibe"], items["occasion"], strict=True):
        fabric = _phrase(rng, FABRICS, fabrics[f])
        words = {"fabric": fabric, "Fabric": fabric[0].upper() + fabric[1:],
                 "vibe": _phrase(rng, VIBES, vibes[v]), "occasion": _phrase(rng, OCCASIONS, occasions[o])}
        sentence = ITEM_TEMPLATES[int(rng.integers(len(ITEM_TEMPLATES)))].format(**words)
        filler = ITEM_FILLERS[int(rng.integers(len(ITEM_FILLERS)))]
        texts.append(f"{sentence} {filler}".strip())
    return texts


def _user_texts(users: dict[str, np.ndarray], stated: np.ndarray, rng: np.random.Generator) -> list[str]:
    texts = []
    names = {factor: list(levels) for factor, levels in TEXT_FACTORS.items()}
    for u in range(len(users["region"])):
        job, hobby = JOBS[int(rng.integers(len(JOBS)))], HOBBIES[int(rng.integers(len(HOBBIES)))]
        words = {"job": job, "Job": job.capitalize(), "hobby": hobby, "region": REGIONS[users["region"][u]]}
        for factor, variants in TEXT_FACTORS.items():
            phrase = _phrase(rng, variants, names[factor][users[factor][u]])
            words[factor], words[factor.capitalize()] = phrase, phrase[0].upper() + phrase[1:]
        sentences = [
            USER_FACTOR_SENTENCES[factor][int(rng.integers(3))].format(**words)
            for k, factor in enumerate(TEXT_FACTORS) if stated[u, k]
        ]
        sentences = [sentences[k] for k in rng.permutation(len(sentences))]
        opener = USER_OPENERS[int(rng.integers(len(USER_OPENERS)))].format(**words)
        filler = USER_FILLERS[int(rng.integers(len(USER_FILLERS)))].format(**words)
        texts.append(" ".join(s for s in [opener, *sentences, filler] if s))
    return texts


def _structured_affinity(users: dict, items: dict, u: np.ndarray, i: np.ndarray,
                         rng: np.random.Generator) -> np.ndarray:
    """User columns x item columns: age vs age range, region vs sleeve and brand, loyalty vs price."""
    age_bucket = np.digitize(users["age"], [25, 35, 45])
    age_match = 1.0 - 0.6 * np.abs(np.subtract.outer(np.arange(4), np.arange(4)))
    region_sleeve = rng.normal(0.0, 1.0, (len(REGIONS), len(SLEEVES)))
    region_brand = rng.normal(0.0, 0.7, (len(REGIONS), len(BRANDS)))
    loyalty = np.digitize(users["years_registered"], [2, 5, 10])
    loyalty_price = np.outer(np.linspace(-1, 1, 4), np.linspace(-1, 1, 4))
    return (age_match[age_bucket[u], items["age_range"][i]]
            + region_sleeve[users["region"][u], items["sleeve"][i]]
            + region_brand[users["region"][u], items["brand"][i]]
            + loyalty_price[loyalty[u], items["price_band"][i]])


def draw_entities(cfg: SynthConfig, rng: np.random.Generator) -> tuple[dict, dict]:
    """Every user's and item's hidden attributes (level indices): the generator's first draws, so
    `draw_entities(cfg, np.random.default_rng(cfg.seed))` recovers a written shop's truth."""
    pick = lambda levels, n: rng.integers(0, len(levels), n)  # noqa: E731
    items = {factor: pick(levels, cfg.items) for factor, levels in {**TEXT_FACTORS, **IMAGE_FACTORS}.items()}
    items |= {"brand": pick(BRANDS, cfg.items), "sleeve": pick(SLEEVES, cfg.items), "length": pick(LENGTHS, cfg.items),
              "age_range": pick(AGE_RANGES, cfg.items), "price_band": pick(PRICE_BANDS, cfg.items)}
    users = {factor: pick(levels, cfg.users) for factor, levels in {**TEXT_FACTORS, **IMAGE_FACTORS}.items()}
    users |= {"gender": rng.choice(len(GENDERS), cfg.users, p=GENDER_WEIGHTS), "size": pick(SIZES, cfg.users),
              "region": pick(REGIONS, cfg.users), "age": rng.integers(18, 71, cfg.users),
              "years_registered": rng.integers(0, 16, cfg.users)}
    return users, items


def generate(cfg: SynthConfig, out: Path, overwrite: bool = False, workers: int | None = None) -> DatasetSpec:
    """Write the synthetic shop described by `cfg` to the folder `out` (atomically)."""
    cfg.check()
    rng = np.random.default_rng(cfg.seed)
    n_users, n_items = cfg.users, cfg.items
    users, items = draw_entities(cfg, rng)
    stated = rng.random((n_users, len(TEXT_FACTORS))) >= UNSTATED
    has_picture = rng.random(n_users) >= NO_PICTURE

    u, i = _sample_pairs(cfg, rng)
    parts = {}
    for modality, factors in (("text", TEXT_FACTORS), ("image", IMAGE_FACTORS)):
        total = np.zeros(len(u))
        for factor, levels in factors.items():
            taste = _tastes(n_users, len(levels), users[factor], rng)
            total += taste[u, items[factor][i]]
        parts[modality] = total
    parts["structured"] = _structured_affinity(users, items, u, i, rng)
    parts["bias"] = rng.normal(0.0, 1.0, n_users)[u] + rng.normal(0.0, 1.0, n_items)[i]
    scaled = {name: _standardise(values, SHARES[name]) for name, values in parts.items()}
    latent = MEAN + sum(scaled.values())
    stars = np.clip(np.round(latent + rng.normal(0.0, NOISE_SD, len(u))), RATING_MIN, RATING_MAX)
    floor, _ = _bayes_floor(latent)
    timestamps = 1_600_000_000 + rng.integers(0, 3 * 365 * 86400, len(u))

    user_ids, item_ids = entity_ids("u", n_users), entity_ids("i", n_items)
    item_texts = _item_texts(items, rng)
    user_texts = _user_texts(users, stated, rng)
    price = np.round(np.array(PRICE_BASE)[items["price_band"]] * rng.uniform(0.8, 1.25, n_items), 2)

    # Without rendering (--no-images) the image columns stay, empty: every picture is "missing".
    item_images = np.array([f"images/items/{x}.png" if cfg.images else None for x in item_ids], dtype=object)
    user_images = np.array([f"images/users/{x}.png" if cfg.images and p else None
                            for x, p in zip(user_ids, has_picture, strict=True)], dtype=object)
    items_frame = pd.DataFrame({
        "item_id": item_ids, "description": item_texts, "image": item_images,
        "brand": np.array(BRANDS)[items["brand"]], "sleeve": np.array(SLEEVES)[items["sleeve"]],
        "length": np.array(LENGTHS)[items["length"]], "age_range": np.array(AGE_RANGES)[items["age_range"]],
        "price_band": np.array(PRICE_BANDS)[items["price_band"]], "price": price,
    })
    users_frame = pd.DataFrame({
        "user_id": user_ids, "self_intro": user_texts, "image": user_images,
        "gender": np.array(GENDERS)[users["gender"]], "size": np.array(SIZES)[users["size"]],
        "region": np.array(REGIONS)[users["region"]], "age": users["age"].astype(np.int64),
        "years_registered": users["years_registered"].astype(np.int64),
    })
    ratings_frame = pd.DataFrame({
        "user_id": user_ids[u], "item_id": item_ids[i], "rating": stars.astype(np.int64), "timestamp": timestamps,
    })

    signal_variance = float(sum(scaled.values()).var())  # includes the small chance covariances between terms
    realised = {name: round(float(v.var() / signal_variance), 4) for name, v in scaled.items()}
    spec = DatasetSpec(
        name="synthetic-shop",
        rating_min=RATING_MIN,
        rating_max=RATING_MAX,
        relevance_threshold=4,
        users=TableSpec("user_id", "self_intro", "image", ("gender", "size", "region"), ("age", "years_registered")),
        items=TableSpec("item_id", "description", "image", ("brand", "sleeve", "length", "age_range", "price_band"),
                        ("price",)),
        source="fusionrec data synth",
        truth={
            "bayes_mse": round(floor, 6),
            "noise_variance": round(floor, 6),
            "latent_noise_sd": NOISE_SD,
            "signal_variance": round(signal_variance, 6),
            "shares": dict(SHARES),
            "realised_shares": realised,
            "factors": {
                "text": list(TEXT_FACTORS), "image": list(IMAGE_FACTORS),
                "structured": ["age x age_range", "region x sleeve", "region x brand",
                               "years_registered x price_band"],
                "bias": ["user bias", "item bias"],
            },
            "notes": "bayes_mse (= noise_variance) is the expected test MSE of E[rating | latent], the least any "
                     "model can reach; shares are each term's part of the latent signal variance.",
            "generator": asdict(cfg),
        },
    )
    pictures = []
    if cfg.images:
        for kind, ids, table, keep in (("items", item_ids, items, np.ones(n_items, bool)),
                                       ("users", user_ids, users, has_picture)):
            for k in np.flatnonzero(keep):
                pictures.append(Picture(Path(f"images/{kind}/{ids[k]}.png"), int(table["style"][k]),
                                        int(table["colour"][k]), int(table["pattern"][k]), kind == "users",
                                        (cfg.seed, kind == "users", int(k))))
    with atomic_directory(out, overwrite) as tmp:
        spec.write(tmp)
        users_frame.to_parquet(tmp / "users.parquet", index=False)
        items_frame.to_parquet(tmp / "items.parquet", index=False)
        ratings_frame.to_parquet(tmp / "ratings.parquet", index=False)
        if pictures:
            pictures = [Picture(tmp / p.path, p.style, p.colour, p.pattern, p.portrait, p.seed) for p in pictures]
            render_all(pictures, cfg.image_size, workers or os.cpu_count() or 1)
    return spec
