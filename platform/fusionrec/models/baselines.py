"""The baselines, behind the same `Recommender` interface (forward / score / score_all) as
FusionNeuMF, so one evaluator scores them all.

    svd  : mu + b_u + b_i + p_u . q_i (biased matrix factorisation)
    dnn  : MLP over [structured ++ bag-of-words] of user and item, no IDs
    cnn  : per side a small CNN over the raw 32 px image and an embedding bag over the hashed words,
           trained end to end; MLP over both sides, no IDs

And the cold-item ranking baselines a practitioner reaches for first. Neither has a parameter or a
gradient step: `fit_ratings(users, items)` reads the training part once and stores what it needs
as buffers (saved in the bundle's state dict like any weights).
`training.engine.fit_in_one_pass` fits it instead of the Ray Train loop (`CountModel`): DDP refuses a module without
trainable parameters and Adam an empty parameter list, and there are no epochs to choose.

    genre-pop   : score(i) = popularity(i), the number of training ratings of i, for an item with
                  training ratings; a cold item has none, so it scores the mean over its attributes
                  a of pop(a) = the mean popularity of the training items that have a. Attributes are
                  the item side's categorical levels (one-hot columns) and its 0/1 numeric flags
                  (MovieLens's genre_* columns). Not personalised: every user gets the same list.
    content-knn : score(u, i) = mean of the `neighbours` largest cosines between i's text embedding
                  and the text embeddings of the items u rated in training (all of them if u rated
                  fewer, or with neighbours = 0); 0 for a user without training ratings.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fusionrec.models.config import ModelConfig
from fusionrec.models.content import PIXELS, SideContent
from fusionrec.models.layers import mlp, set_mean
from fusionrec.models.nets import Recommender


class BiasedMF(Recommender):
    """mu + b_u + b_i + p_u . q_i; the unknown rows stay zero, so unseen entities get mu + the other bias."""

    def __init__(self, users: SideContent, items: SideContent, config: ModelConfig):
        super().__init__(users, items, config)
        d = config.embedding_dim
        self.p, self.q = nn.Embedding(users.n + 1, d), nn.Embedding(items.n + 1, d)
        self.b_u, self.b_i = nn.Embedding(users.n + 1, 1), nn.Embedding(items.n + 1, 1)
        for table in (self.p, self.q):
            nn.init.normal_(table.weight, std=0.05)
        for table in (self.b_u, self.b_i):
            nn.init.zeros_(table.weight)
        self.mu = nn.Parameter(torch.tensor(float(config.global_mean)))

    def id_embeddings(self) -> list[nn.Parameter]:
        return [self.p.weight, self.q.weight]

    def score(self, user, item):
        u, i = user["ids"], item["ids"]
        return self.mu + self.b_u(u).squeeze(-1) + self.b_i(i).squeeze(-1) + (self.p(u) * self.q(i)).sum(-1)


class ContentDNN(Recommender):
    """An MLP over both sides' structured features and bag-of-words text."""

    def __init__(self, users: SideContent, items: SideContent, config: ModelConfig):
        super().__init__(users, items, config)
        width = sum(b.structured.shape[1] + b.words.shape[1] for b in (self.users, self.items))
        self.net = mlp([width, *config.mlp])
        self.out = nn.Linear(config.mlp[-1], 1)
        nn.init.constant_(self.out.bias, config.global_mean)

    def score(self, user, item):
        x = torch.cat([user["structured"], user["words"], item["structured"], item["words"]], dim=1)
        return self.out(self.net(x)).squeeze(-1)


class ContentCNN(Recommender):
    """The CNN-based multimodal baseline: raw pixels and words, learned from scratch."""

    def __init__(self, users: SideContent, items: SideContent, config: ModelConfig):
        super().__init__(users, items, config)
        d = config.content_dim

        def image_net() -> nn.Module:  # [batch, 3, PIXELS, PIXELS] -> [batch, d]
            return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(32, d))

        self.user_image, self.item_image = image_net(), image_net()
        # An embedding bag over hashed words with their counts as weights is a linear map of the counts.
        self.user_words = nn.Linear(self.users.words.shape[1], d) if self.users.words.shape[1] else None
        self.item_words = nn.Linear(self.items.words.shape[1], d) if self.items.words.shape[1] else None
        width = 2 * d + d * (self.user_words is not None) + d * (self.item_words is not None)
        self.net = mlp([width, *config.mlp])
        self.out = nn.Linear(config.mlp[-1], 1)
        nn.init.constant_(self.out.bias, config.global_mean)

    def _side(self, side, image_net, words_net) -> list[torch.Tensor]:
        pixels = side["pixels"]
        if pixels.shape[1] == 0:  # no images in this dataset: a zero picture
            pixels = torch.zeros(len(pixels), 3 * PIXELS * PIXELS, device=pixels.device)
        parts = [image_net(pixels.view(-1, 3, PIXELS, PIXELS))]
        return parts + ([words_net(side["words"])] if words_net is not None else [])

    def score(self, user, item):
        x = torch.cat(self._side(user, self.user_image, self.user_words) +
                      self._side(item, self.item_image, self.item_words), dim=1)
        return self.out(self.net(x)).squeeze(-1)


class CountModel(Recommender):
    """A model fitted in one pass from the training ratings (row indices), without gradients."""

    def fit_ratings(self, users: np.ndarray, items: np.ndarray) -> None:
        raise NotImplementedError


class GenrePopularity(CountModel):
    def __init__(self, users: SideContent, items: SideContent, config: ModelConfig):
        super().__init__(users, items, config)
        width = self.items.structured.shape[1]
        self.n_categorical = sum(len(levels) for levels in items.encoder.categorical.values())
        self.numeric = list(items.encoder.numeric.values())  # (mean, std) of each numeric column, in order
        self.register_buffer("popularity", torch.zeros(self.items.n + 1))  # training ratings per item row
        # A structured column marks an attribute where it holds `on_value` (NaN: not an attribute
        # column); `attribute_popularity` is pop(a), NaN where no training item has it.
        self.register_buffer("on_value", torch.full((width,), float("nan")))
        self.register_buffer("attribute_popularity", torch.full((width,), float("nan")))
        self.register_buffer("fallback", torch.zeros(()))  # mean popularity of the training items

    def _on_values(self) -> torch.Tensor:
        """One-hot columns: 1. A numeric column that takes exactly the raw values 0 and 1 (a flag):
        the z-score of 1 (a missing value is 0, the mean, so it is not taken for either)."""
        known = self.items.structured[:self.items.n]
        on = torch.full((known.shape[1],), float("nan"))
        on[:self.n_categorical] = 1.0
        for k, (mean, std) in enumerate(self.numeric):
            column = self.n_categorical + k
            raw = torch.unique(known[:, column]) * std + mean  # the encoder z-scored it
            if len(raw) == 2 and torch.allclose(raw, torch.tensor([0.0, 1.0]), atol=1e-4):
                on[column] = (1.0 - mean) / std
        return on

    def _has(self, structured: torch.Tensor) -> torch.Tensor:
        """[rows, width]: which attributes each row has."""
        return torch.isclose(structured, self.on_value.expand_as(structured), atol=1e-5)

    def fit_ratings(self, users: np.ndarray, items: np.ndarray) -> None:
        counts = torch.bincount(torch.tensor(np.asarray(items), dtype=torch.long), minlength=self.items.n + 1).float()
        self.popularity.copy_(counts)
        self.on_value.copy_(self._on_values())
        trained = counts[:self.items.n] > 0
        has = self._has(self.items.structured[:self.items.n])[trained].float()  # [training items, width]
        per_attribute = counts[:self.items.n][trained] @ has  # summed popularity of the items with each
        self.attribute_popularity.copy_(torch.where(has.sum(0) > 0, per_attribute / has.sum(0), float("nan")))
        self.fallback.copy_(counts[:self.items.n][trained].mean() if trained.any() else torch.zeros(()))

    def score(self, user, item):
        has = self._has(item["structured"]) & ~torch.isnan(self.attribute_popularity)  # [batch, width]
        total = torch.where(has, self.attribute_popularity, 0.0).sum(1)
        count = has.sum(1)
        genre = torch.where(count > 0, total / count.clamp(min=1), self.fallback)
        warm = item["ids"] < self.items.n  # an item with training ratings has a popularity of its own
        return torch.where(warm, self.popularity[item["ids"]], genre)


class ContentKNN(CountModel):
    def __init__(self, users: SideContent, items: SideContent, config: ModelConfig):
        super().__init__(users, items, config)
        if self.items.text.shape[1] == 0:
            raise ValueError("content-knn needs item text embeddings: pass --features from `fusionrec encode`")
        # Each user row's training items, as CSR: history_items[history_start[u]:history_start[u + 1]].
        self.register_buffer("history_start", torch.zeros(self.users.n + 2, dtype=torch.long))
        self.register_buffer("history_items", torch.zeros(0, dtype=torch.long))
        self._unit_cache: torch.Tensor | None = None  # the known items' unit text vectors

    def _unit_items(self) -> torch.Tensor:
        if self._unit_cache is None:
            self._unit_cache = self._unit(set_mean(self.items.text[:self.items.n], self.items.sets["text"]))
        return self._unit_cache

    def fit_ratings(self, users: np.ndarray, items: np.ndarray) -> None:
        pairs = np.unique(np.stack([users, items], axis=1).astype(np.int64), axis=0)  # sorted by user
        counts = np.bincount(pairs[:, 0], minlength=self.users.n + 1)
        self.history_start.copy_(torch.as_tensor(np.concatenate([[0], np.cumsum(counts)])))
        self.history_items = torch.as_tensor(pairs[:, 1].copy())
        self._unit_cache = None

    def load_state_dict(self, state_dict, *args, **kwargs):
        # the history's length is the number of training pairs, unknown until the weights are read
        self.history_items = torch.zeros_like(state_dict["history_items"])
        self._unit_cache = None
        return super().load_state_dict(state_dict, *args, **kwargs)

    @staticmethod
    def _unit(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x.float(), dim=1)  # all-zero rows (no text) stay zero

    def _knn(self, user: int, items: torch.Tensor) -> torch.Tensor:
        """[len(items)]: the mean of each unit vector's top-k cosines with user row `user`'s training items."""
        history = self.history_items[self.history_start[user]:self.history_start[user + 1]]
        if not len(history):
            return torch.zeros(len(items))
        similarity = items @ self._unit_items()[history].T  # [items, history]
        k = len(history) if self.config.neighbours == 0 else min(self.config.neighbours, len(history))
        return similarity.topk(k, dim=1).values.mean(1)

    def score(self, user, item):
        users = user["ids"]
        items = self._unit(set_mean(item["text"], self.items.sets["text"]))  # [batch, dim]
        out = torch.zeros(len(users))
        for u in torch.unique(users).tolist():
            rows = users == u
            out[rows] = self._knn(u, items[rows])
        return out

    @torch.no_grad()
    def score_all_for(self, user):
        """Every known item for one user (what score() gives, without expanding the user to n rows)."""
        return self._knn(int(user["ids"][0]), self._unit_items())
