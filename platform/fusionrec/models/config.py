"""Which model to build and with what settings (`ModelConfig`), and the names it may take: plain
data, no torch, so the CLI and configuration read it without loading the models (models/nets.py,
models/baselines.py build them; models/factory.py picks the one a config names).
"""

from __future__ import annotations

from dataclasses import dataclass, field

VARIANTS = ("full", "no_image", "no_text", "no_structured", "id_only")
FIXED_VARIANT = {"neumf": "id_only"}  # the variant of FusionNeuMF that a baseline is
MODELS = {
    "fusion": "FusionNeuMF: ID embeddings (GMF + MLP) fused with text, image and structured content",
    "neumf": "NeuMF (He et al. 2017) with IDs only",
    "svd": "biased matrix factorisation (the 'SVD' baseline)",
    "dnn": "MLP over structured one-hots and bag-of-words text (no IDs)",
    "cnn": "small CNN over raw 32 px images + embedding bag over text, trained end to end (no IDs)",
    "genre-pop": "ranking baseline: an item's training popularity; a cold item's, the mean of its genres' "
                 "(categorical attributes, 0/1 flags) over training items (no gradients)",
    "content-knn": "ranking baseline: mean of the top-k cosines between an item's text embedding and the "
                   "user's training items' (no gradients)",
}
# Fitted in one pass from the training ratings, no parameters and no gradient steps (models/baselines.py);
# they rank items and predict no ratings, so they train under the implicit objective only.
NO_GRADIENT = ("genre-pop", "content-knn")
ID_DROPOUT_CAP = 0.5


@dataclass
class ModelConfig:
    model: str = "fusion"
    variant: str = "full"
    mlp: list[int] = field(default_factory=lambda: [128, 64])
    embedding_dim: int = 32
    content_dim: int = 32
    content_hidden: list[int] = field(default_factory=list)  # hidden widths of each content projection; [] = linear
    # `codebooks` > 0: each text/image projection ends in that many softmaxes over `codebook_size`
    # codes (see layers.Codebooks) instead of a linear map to `content_dim`.
    codebooks: int = 3
    codebook_size: int = 8
    # 0.05 was chosen on validation over both datasets: on MovieLens-100K 0.2 cost the ranking (warm
    # and cold items), on the shop 0.05 and 0.2 validate level, cold-start included (docs/quality.md).
    id_dropout: float = 0.05
    # `id_dropout_by_count`: each id is dropped at id_dropout x (the side's median number of training
    # ratings / its own), at most ID_DROPOUT_CAP (or id_dropout if higher): a well-observed id leans on
    # its embedding, a rarely seen one learns to score from content (on MovieLens a flat rate cost the
    # ranking: docs/quality.md).
    id_dropout_by_count: bool = True
    # `standardise`: text/image embeddings z-scored per dimension with the mean and std of the
    # side's content (the known users or items that have the text/image; missing ones stay zero)
    # and divided by sqrt(width) before the shared projections (see SideTower).
    # `content_dropout`: in training, drop the content entries of the vectors the MLP branch reads.
    standardise: bool = True
    content_dropout: float = 0.5
    global_mean: float = 0.0
    neighbours: int = 20  # content-knn: the user's k most similar training items averaged (0: all of them)

    def check(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        # Only FusionNeuMF has ablation variants; neumf is its id_only variant (and saved as such).
        if self.model != "fusion" and self.variant not in ("full", FIXED_VARIANT.get(self.model)):
            raise ValueError(f"--variant {self.variant}: only the fusion model has variants ({self.model} has none)")
        if not self.mlp or min(self.mlp) < 1:
            raise ValueError(f"--mlp needs positive widths, got {self.mlp}")
        if not 0 <= self.id_dropout < 1:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
        if not 0 <= self.content_dropout < 1:
            raise ValueError(f"content_dropout must be in [0, 1), got {self.content_dropout}")
        if self.codebooks < 0 or self.codebook_size < 2:
            raise ValueError(f"codebooks must be >= 0 and codebook_size >= 2, got {self.codebooks} and "
                             f"{self.codebook_size}")
        if self.neighbours < 0:
            raise ValueError(f"neighbours must be non-negative (0: all), got {self.neighbours}")
