"""The models. Each holds both sides' content as buffers, so `forward(users, items)` takes only
row indices (index n = the unknown user/item), `score_all(user)` ranks every item, and
`score_all_for(row)` ranks every item for a user given as one row of content (a cold-start user).

    FusionNeuMF (the paper's model), per side:
        p   = id embedding (shared by both branches; randomly swapped for the unknown row in
              training, so unseen users/items score from content: with probability id_dropout,
              or with `id_dropout_by_count` id_dropout x median count / the id's count, capped)
        b   = id bias
        t, v = text and image CLS embeddings (z-scored, / sqrt(width)), each through a projection
              that users and items share: the fusion layer, per modality (linear, or with
              `codebooks`, a few softmaxes over learned codes: see layers.Codebooks); a text kept as a
              set of sentence vectors is first attended over (layers.SetPooling, one head per book)
        s   = MLP(structured one-hots ++ numbers), per side
        vector x = [p ++ T t ++ V v ++ s]   (content entries dropped out where the MLP reads them)
    rating = w . [x_u * x_i  ++  MLP_128->64(x_u ++ x_i)] + b_u + b_i + c

    neumf: FusionNeuMF with IDs only (variant id_only, no ID dropout)
    svd, dnn, cnn, genre-pop, content-knn: the baselines (models/baselines.py)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fusionrec.models.config import ID_DROPOUT_CAP, ModelConfig
from fusionrec.models.content import SideContent
from fusionrec.models.layers import AttendedProjection, Codebooks, is_present, mlp, out_width

CONTENT = ("text", "image", "structured", "words", "pixels")  # SideContent.arrays(), per row


class ContentBank(nn.Module):
    """One side's content matrices as buffers; `gather(idx)` returns the rows for a batch.

    `seen` marks who had training ratings: everyone else is given the unknown id (row n), so a
    cold-start user or item is scored from its own content and the learned "unknown" embedding,
    never from an untrained random one."""

    def __init__(self, side: SideContent):
        super().__init__()
        self.n = side.n
        for name, matrix in side.arrays().items():
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(matrix)))
        self.register_buffer("seen", torch.ones(side.n + 1, dtype=torch.bool))
        self.sets = {"text": side.text_set, "image": 1}  # vectors per row (see SideContent.text_set)

    def mark_seen(self, idx: np.ndarray) -> None:
        self.seen.zero_()
        self.seen[torch.as_tensor(np.unique(idx), dtype=torch.long)] = True

    def gather(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = torch.where(self.seen[idx], idx, self.n)
        return {"ids": ids, **{name: getattr(self, name)[idx] for name in CONTENT}}

    def known(self) -> dict[str, torch.Tensor]:
        """All n known rows, as views (no copy): what gather(arange(n)) returns."""
        idx = torch.arange(self.n, device=self.seen.device)
        return {"ids": torch.where(self.seen[:self.n], idx, self.n),
                **{name: getattr(self, name)[:self.n] for name in CONTENT}}

    def row(self, **content: np.ndarray) -> dict[str, torch.Tensor]:
        """One unknown entity as a gathered row ([1, dim] each): the given content, zeros elsewhere."""
        out = {"ids": torch.tensor([self.n], device=self.seen.device)}
        for name in CONTENT:
            width, value = getattr(self, name).shape[1], content.get(name)
            out[name] = (torch.zeros(1, width, device=self.seen.device) if value is None
                         else torch.as_tensor(value, device=self.seen.device).float().view(1, width))
        return out


class Recommender(nn.Module):
    """The shared interface: forward(users, items) -> scores; score_all(user) -> every item's score."""

    def __init__(self, users: SideContent, items: SideContent, config: ModelConfig):
        super().__init__()
        self.config = config
        self.users, self.items = ContentBank(users), ContentBank(items)

    def mark_seen(self, users: np.ndarray, items: np.ndarray) -> None:
        """Record which users and items have training ratings (see ContentBank)."""
        self.users.mark_seen(users)
        self.items.mark_seen(items)

    @property
    def device(self) -> torch.device:
        """Where the model is: its content matrices are buffers, moved along by `.to()`."""
        return self.users.seen.device

    def id_embeddings(self) -> list[nn.Parameter]:
        """The id embedding tables: what training regularises with L2 (`id_l2`). None unless a model
        has them; each model names its own (as nanoGPT's `configure_optimizers` splits what decays)."""
        return []

    def code_logits(self) -> list[nn.Parameter]:
        """The weight matrices that map content to the codebooks' logits: what training decays with
        `code_l2`. None unless a model has codebooks."""
        return []

    def parameter_groups(self, id_l2: float, code_l2: float) -> list[dict]:
        """The optimiser's groups: the id embeddings with weight decay `id_l2`, the codebooks' logit
        weights with `code_l2`, every other parameter without."""
        ids, codes = {id(p) for p in self.id_embeddings()}, {id(p) for p in self.code_logits()}
        return [{"params": [p for p in self.parameters() if id(p) in ids], "weight_decay": id_l2},
                {"params": [p for p in self.parameters() if id(p) in codes], "weight_decay": code_l2},
                {"params": [p for p in self.parameters() if id(p) not in ids | codes], "weight_decay": 0.0}]

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.score(self.users.gather(users), self.items.gather(items))

    def score(self, user: dict[str, torch.Tensor], item: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score_all(self, user: int) -> torch.Tensor:
        """[n_items] scores of every item for user row `user`."""
        return self.score_all_for(self.users.gather(torch.tensor([user], device=self.device)))

    @torch.no_grad()
    def score_all_for(self, user: dict[str, torch.Tensor]) -> torch.Tensor:
        """[n_items] scores of every item for one user given as a gathered row ([1, dim] each)."""
        items = self.items.known()
        n = self.items.n
        return self.score({k: v.expand(n, *v.shape[1:]) for k, v in user.items()}, items)

    @torch.no_grad()
    def score_items(self, user: int, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows)] scores of the item rows `rows` for user row `user`: score_all(user)[rows]."""
        return self.score_items_for(self.users.gather(torch.tensor([user], device=self.device)), rows)

    @torch.no_grad()
    def score_items_for(self, user: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """[len(rows)] scores of the item rows `rows` for one user given as a gathered row: what
        score_all_for(user)[rows] holds, computed for those rows only (the re-ranking stage)."""
        return self.score({k: v.expand(len(rows), *v.shape[1:]) for k, v in user.items()}, self.items.gather(rows))


class SideTower(nn.Module):
    """One side of FusionNeuMF: the id embedding plus the content vectors that join it.

    Text and image each go through a projection that users and items share (`media`, built by
    FusionNeuMF): both sides' texts come from one encoder, so a user's "I love silk" and an item's
    "made of silk" land near each other, and one map serves both. The embeddings are z-scored and
    divided by sqrt(dim) first, so Adam's per-weight steps move a 384-wide projection no faster
    than an id embedding (without it the GMF product of two projections diverged)."""

    def __init__(self, bank: ContentBank, config: ModelConfig, media: nn.ModuleDict):
        super().__init__()
        v = config.variant
        self.unknown = bank.n
        self.id_dropout = config.id_dropout
        self.id_dropout_by_count = config.id_dropout_by_count
        # Per-id rates, set from the training counts by set_id_dropout; not saved (training only).
        self.register_buffer("id_dropout_rate", torch.full((bank.n + 1,), config.id_dropout), persistent=False)
        self.ids = nn.Embedding(bank.n + 1, config.embedding_dim)
        self.bias = nn.Embedding(bank.n + 1, 1)
        nn.init.normal_(self.ids.weight, std=0.01)
        nn.init.zeros_(self.bias.weight)
        self.media = media
        self.sets = bank.sets
        self.own_media = [name for name in media if getattr(bank, name).shape[1] > 0]  # this side has it
        self.standardise = config.standardise
        if self.standardise:  # buffers: saved with the model, so serving scales the same way
            for name in self.own_media:  # over single vectors: a set's are moments of its sentence vectors
                vectors = getattr(bank, name)[:bank.n].reshape(bank.n * bank.sets[name], -1)
                mean, std = _moments(vectors)
                self.register_buffer(f"{name}_mean", mean)
                self.register_buffer(f"{name}_scale", std * vectors.shape[1] ** 0.5)
        structured_dim = 0 if v in ("no_structured", "id_only") else bank.structured.shape[1]
        widths = [*config.content_hidden, config.content_dim]
        self.structured = mlp([structured_dim, *widths], final_activation=False) if structured_dim else None
        self.widths = {name: out_width(projection) for name, projection in media.items()}
        self.out_dim = (config.embedding_dim + sum(self.widths.values())
                        + config.content_dim * (self.structured is not None))

    def forward(self, side: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(vector, bias) for a batch of one side: vector = [id ++ text ++ image ++ structured]."""
        ids = side["ids"]
        if self.training and self.id_dropout > 0:
            ids = torch.where(torch.rand(ids.shape, device=ids.device) < self.id_dropout_rate[ids], self.unknown, ids)
        parts = [self.ids(ids)]  # [batch, embedding_dim]
        for name, projection in self.media.items():  # [batch, content_dim] each; zeros if this side has none
            parts.append(projection(self._embedding(side, name)) if name in self.own_media
                         else parts[0].new_zeros(len(ids), self.widths[name]))
        if self.structured is not None:
            parts.append(self.structured(side["structured"]))
        return torch.cat(parts, dim=1), self.bias(ids).squeeze(-1)  # [batch, out_dim], [batch]

    def set_id_dropout(self, idx: np.ndarray) -> None:
        """Per-id dropout rates from the training rows `idx` (one per rating; see ModelConfig)."""
        if not self.id_dropout_by_count:
            return
        counts = torch.as_tensor(np.bincount(idx, minlength=self.unknown + 1), dtype=torch.float32)
        median = counts[counts > 0].median() if (counts > 0).any() else torch.tensor(1.0)
        rate = (self.id_dropout * median / counts.clamp(min=1)).clamp(max=max(self.id_dropout, ID_DROPOUT_CAP))
        self.id_dropout_rate.copy_(torch.where(counts > 0, rate, 0.0))

    def _embedding(self, side: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """[batch, dim], or [batch, set, dim] for sets of vectors."""
        x = side[name]
        if self.sets[name] > 1:
            x = x.view(len(x), self.sets[name], -1)
        if not self.standardise:
            return x
        # no text/image (the unknown row, padding) is all zeros, and stays so
        return torch.where(is_present(x), (x - getattr(self, f"{name}_mean")) / getattr(self, f"{name}_scale"), 0.0)


def _moments(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std over the rows that are not all zeros (0 and 1 if there are none)."""
    rows = matrix[is_present(matrix)[:, 0]]
    if len(rows) < 2:
        return torch.zeros(matrix.shape[1]), torch.ones(matrix.shape[1])
    return rows.mean(0), rows.std(0).clamp(min=1e-6)


def _media_projections(users: ContentBank, items: ContentBank, config: ModelConfig) -> nn.ModuleDict:
    """One projection per modality, shared by users and items (see SideTower)."""
    skip = {"no_text": {"text"}, "no_image": {"image"}, "id_only": {"text", "image"}}.get(config.variant, set())
    projections = nn.ModuleDict()
    for name in ("text", "image"):
        shapes = {(getattr(bank, name).shape[1], bank.sets[name]) for bank in (users, items)
                  if getattr(bank, name).shape[1]}
        if name in skip or not shapes:
            continue
        if len(shapes) > 1:
            raise ValueError(f"users' and items' {name} embeddings differ in width or set size ({sorted(shapes)}): "
                             "encode both sides with one model and the same chunking")
        width, size = shapes.pop()
        dim = width // size
        projection = (Codebooks(dim, config.content_hidden, config.codebooks, config.codebook_size)
                      if config.codebooks else mlp([dim, *config.content_hidden, config.content_dim],
                                                   final_activation=False))
        projections[name] = AttendedProjection(dim, projection) if size > 1 else projection
    return projections


class FusionNeuMF(Recommender):
    def __init__(self, users: SideContent, items: SideContent, config: ModelConfig):
        super().__init__(users, items, config)
        media = _media_projections(self.users, self.items, config)
        self.user_tower, self.item_tower = SideTower(self.users, config, media), SideTower(self.items, config, media)
        gmf_dim = self.user_tower.out_dim
        self.mlp = mlp([2 * gmf_dim, *config.mlp])
        self.out = nn.Linear(gmf_dim + config.mlp[-1], 1)
        nn.init.constant_(self.out.bias, config.global_mean)
        if config.codebooks:
            # Codes start as matches: a user and an item on the same code of a book raise the score.
            # With the default init (small weights of either sign) the softmaxes got no consistent
            # gradient to organise around, and the codes learned little (docs/quality.md).
            # The output bias starts lower by the codes' expected match, so the first prediction sits
            # at the training mean, not ~0.75 stars above it (on the 10 % shop fewer starts then
            # settle into a bad arrangement of the codes: docs/quality.md, 2026-12-05).
            with torch.no_grad():
                start = config.embedding_dim
                self.out.weight[0, start:start + sum(self.user_tower.widths.values())] = 1.0
                self.out.bias -= self.expected_match()

        self.content_dropout = nn.Dropout(config.content_dropout)
        self._towers_cache: dict[str, tuple[torch.Tensor, ...]] = {}  # "users"/"items": towers()

    def id_embeddings(self) -> list[nn.Parameter]:
        return [self.user_tower.ids.weight, self.item_tower.ids.weight]

    def code_logits(self) -> list[nn.Parameter]:
        books = [m for m in self.modules() if isinstance(m, Codebooks)]  # shared by both towers: each once
        return [p for book in books for p in book.logits.parameters() if p.dim() == 2]

    def expected_match(self) -> float:
        """What the codes add to a prediction at initialisation: each book that both sides have
        matches with weight 1 and near-uniform softmaxes, so about 1 / codebook_size (a side without
        the modality has all-zero codes there, which match nothing)."""
        both = set(self.user_tower.own_media) & set(self.item_tower.own_media)
        return len(both) * self.config.codebooks / self.config.codebook_size

    def mark_seen(self, users: np.ndarray, items: np.ndarray) -> None:
        super().mark_seen(users, items)
        self._towers_cache = {}  # who is known changed the ids the towers were made with
        self.user_tower.set_id_dropout(users)
        self.item_tower.set_id_dropout(items)

    def _drop_content(self, vector: torch.Tensor) -> torch.Tensor:
        """The MLP branch's view of a side: content entries dropped out in training. The MLP, not
        the GMF product, is what memorises each user's unique content vector (README)."""
        ids = self.config.embedding_dim
        return torch.cat([vector[:, :ids], self.content_dropout(vector[:, ids:])], dim=1)

    def score(self, user, item):
        user_vector, user_bias = self.user_tower(user)  # [batch, out_dim], [batch]
        item_vector, item_bias = self.item_tower(item)
        mlp_input = torch.cat([self._drop_content(user_vector), self._drop_content(item_vector)], dim=1)
        joint = torch.cat([user_vector * item_vector, self.mlp(mlp_input)], dim=1)
        return self.out(joint).squeeze(-1) + user_bias + item_bias  # [batch]

    # The cached towers hold for fixed weights and seen masks: dropped on entering training, loading
    # weights or marking who was seen.
    def train(self, mode: bool = True):
        if mode:
            self._towers_cache = {}
        return super().train(mode)

    def load_state_dict(self, *args, **kwargs):
        self._towers_cache = {}
        return super().load_state_dict(*args, **kwargs)

    def _side_towers(self, side: str, content: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """A side's (vector [n, out_dim], its half of the MLP's first layer [n, mlp[0]], bias [n]);
        the item half carries the layer's bias. The first layer is split so each half is applied
        once per user or item, not once per pair."""
        first, split = self.mlp[0], self.user_tower.out_dim  # Linear over [user_vector ++ item_vector]
        if side == "users":
            vector, bias = self.user_tower(content)
            return vector, vector @ first.weight[:, :split].T, bias
        vector, bias = self.item_tower(content)
        return vector, vector @ first.weight[:, split:].T + first.bias, bias

    @torch.no_grad()
    def towers(self, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every known user's or item's towers (`side` "users" or "items"; see _side_towers),
        computed once and cached. Eval mode only: the cache holds for fixed weights."""
        if side not in self._towers_cache:
            self._towers_cache[side] = self._side_towers(side, getattr(self, side).known())
        return self._towers_cache[side]

    @torch.no_grad()
    def score_all(self, user: int) -> torch.Tensor:
        """score_all_for(that user's row), from both sides' cached towers."""
        if self.training:
            return super().score_all(user)
        return self._score_towers([tower[user:user + 1] for tower in self.towers("users")], *self.towers("items"))

    @torch.no_grad()
    def score_items(self, user: int, rows: torch.Tensor) -> torch.Tensor:
        """score_all(user)[rows], from both sides' cached towers (those rows only on the item side)."""
        if self.training:
            return super().score_items(user, rows)
        return self._score_towers([tower[user:user + 1] for tower in self.towers("users")],
                                  *(tower[rows] for tower in self.towers("items")))

    @torch.no_grad()
    def score_all_for(self, user):
        """Same scores as score(), without recomputing the item towers for every user: in eval mode
        they are cached."""
        if self.training:
            return super().score_all_for(user)
        return self._score_towers(self._side_towers("users", user), *self.towers("items"))

    @torch.no_grad()
    def score_items_for(self, user, rows):
        """score_all_for(user)[rows], from the cached item towers' rows `rows` only."""
        if self.training:
            return super().score_items_for(user, rows)
        return self._score_towers(self._side_towers("users", user), *(tower[rows] for tower in self.towers("items")))

    def _score_towers(self, user, item_vector, item_first, item_bias):
        """One user's scores of items, given the user's towers ([1, out_dim], [1, mlp[0]], [1]) and
        the items' ([n, out_dim], [n, mlp[0]], [n]) -> [n]. The output layer is linear, so
        w . [x_u * x_i ++ h] = x_i . (x_u * w_gmf) + h . w_mlp: no [n, out_dim] product or
        concatenation is made. Known users' towers are cached as well (score_all, score_items)."""
        user_vector, user_first, user_bias = user
        hidden = self.mlp[1:](item_first + user_first)  # [n, mlp[-1]]
        weight = self.out.weight[0]  # [out_dim + mlp[-1]]: the GMF part, then the MLP part
        split = self.user_tower.out_dim
        scores = torch.addmv(hidden @ weight[split:], item_vector, user_vector[0] * weight[:split])  # [n]
        return scores + (self.out.bias + user_bias) + item_bias
