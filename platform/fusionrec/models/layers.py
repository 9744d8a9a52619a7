"""FusionNeuMF's building blocks: an MLP, the codebooks that project text and image embeddings,
and the attention that pools a text kept as a set of sentence vectors (models/nets.py uses them).
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(widths: list[int], final_activation: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if final_activation or k < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Codebooks(nn.Module):
    """A content embedding -> `books` soft assignments, each over `size` codes: [batch, books * size].

    Shared by users and items like the linear projection it replaces, so a user and an item whose
    content falls on the same code of a book meet in the GMF product. Tastes are often categorical
    (a favourite fabric, a colour, a genre): a softmax reads "which one" sharply, where a linear map
    of the embedding mixes every level's direction into every product (docs/quality.md)."""

    def __init__(self, dim: int, hidden: list[int], books: int, size: int):
        super().__init__()
        self.books, self.size, self.out_features = books, size, books * size
        self.logits = mlp([dim, *hidden, books * size], final_activation=False)
        self.input_scale = dim ** 0.5  # SideTower divides embeddings by sqrt(width): undone, so logits start O(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, dim], or [batch, books, dim] with one input per book (SetPooling's heads)."""
        logits = self.logits(x * self.input_scale)  # [batch, books * size] or [batch, books, books * size]
        if x.dim() == 3:  # book b reads only its own input
            logits = logits.view(len(x), self.books, self.books, self.size).diagonal(dim1=1, dim2=2).transpose(1, 2)
        logits = logits.reshape(len(x), self.books, self.size)
        return torch.softmax(logits, dim=-1).flatten(1)  # [batch, books * size]


def is_present(x: torch.Tensor) -> torch.Tensor:
    """[..., dim] -> [..., 1] bool: the vector is not all zeros (all zeros: no text or image, or padding)."""
    return (x != 0).any(dim=-1, keepdim=True)


class SetPooling(nn.Module):
    """A set of sentence vectors [batch, set, dim] (an all-zero vector is padding) -> [batch, heads,
    dim]: per head, a softmax-weighted mean of the set's vectors.

    The scores start at zero, so every head starts as the plain mean of the set (encode's `mean`
    pooling, up to standardising); training can then turn a head to the sentence that states the
    taste it reads (docs/quality.md)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.scores = nn.Linear(dim, heads)
        nn.init.zeros_(self.scores.weight)
        nn.init.zeros_(self.scores.bias)
        self.input_scale = dim ** 0.5  # as in Codebooks: scores start O(1) once they are learned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        present = is_present(x)  # [batch, set, 1]
        # Padding gets a large negative score, not -inf: a row with no vectors (no text) then
        # averages zeros into zero, where -inf would give NaN weights and NaN gradients.
        scores = self.scores(x * self.input_scale).masked_fill(~present, -1e9)  # [batch, set, heads]
        return torch.einsum("bsh,bsd->bhd", torch.softmax(scores, dim=1), x)


class AttendedProjection(nn.Module):
    """A modality's shared projection over sets of vectors: SetPooling, then the projection. With
    codebooks there is one head per book, so each book can read the sentence that states its taste."""

    def __init__(self, dim: int, projection: nn.Module):
        super().__init__()
        self.per_book = isinstance(projection, Codebooks)
        self.pool = SetPooling(dim, projection.books if self.per_book else 1)
        self.projection = projection
        self.out_features = out_width(projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, set, dim]
        pooled = self.pool(x)  # [batch, heads, dim]
        return self.projection(pooled if self.per_book else pooled[:, 0])


def set_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """[rows, size * dim] sets of vectors -> [rows, dim], the mean of each row's present (non-zero)
    vectors: what encode's `mean` chunk pooling gives. Size 1: x itself."""
    if size == 1:
        return x
    vectors = x.reshape(len(x), size, -1)
    present = is_present(vectors).float()
    return (vectors * present).sum(1) / present.sum(1).clamp(min=1)


def out_width(projection: nn.Module) -> int:
    """The width a projection (a Linear, or a Sequential ending in one) gives."""
    return projection.out_features if hasattr(projection, "out_features") else projection[-1].out_features
