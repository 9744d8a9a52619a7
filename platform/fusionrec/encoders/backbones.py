"""BERT and DINOv2 forward passes in plain torch, read straight from a checkpoint's safetensors.

The pipeline's model actors only run forward passes (encoders/batch_inference.py). Loading a model
through transformers costs each of them about 2.5 s of CPU before its first batch (its modeling
code imports torch.distributed.tensor and torch._dynamo, then `from_pretrained`), and on 2 cores
the pool's actors pay it at the same time. These two modules load the default encoders (MiniLM, a
BERT; DINOv2 ViT-S/14) in a fraction of a second and return the same last hidden states
(tests/test_backbones.py holds them to transformers' outputs). Any other architecture, setting or
checkpoint layout loads through transformers' AutoModel, as before (`load` returns None).

    BERT:   x = LN(word[ids] + position[0..T) + token_type[0])
            per layer: x = LN(x + attention(x, mask));  x = LN(x + fc2(gelu(fc1(x))))
    DINOv2: x = [cls ++ conv_14x14(pixels)] + position (bicubic-resized to the patch grid)
            per layer: x = x + g1 * attention(LN(x));  x = x + g2 * fc2(gelu(fc1(LN(x))))
            out = LN(x)
Both return an object with `last_hidden_state` [batch, tokens, hidden], as transformers' do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = "model.safetensors"


@dataclass
class Hidden:
    last_hidden_state: torch.Tensor  # [batch, tokens, hidden]


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, bias: bool = True):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, width, bias=bias) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [batch, tokens, width]; mask [batch, 1, 1, tokens], True where a key may be attended to."""
        batch, tokens, width = x.shape
        q, k, v = (proj(x).view(batch, tokens, self.heads, -1).transpose(1, 2)  # [batch, heads, tokens, head]
                   for proj in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, tokens, width))


class BertLayer(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.attention = SelfAttention(c.hidden_size, c.num_attention_heads)
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x, mask))  # post-norm, as BERT has it
        return self.norm2(x + self.fc2(F.gelu(self.fc1(x))))


class Bert(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.words = nn.Embedding(c.vocab_size, c.hidden_size)
        self.positions = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_types = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Hidden:
        """input_ids, attention_mask [batch, tokens] (mask 1 for a token, 0 for padding)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.words(input_ids) + self.positions(positions) + self.token_types.weight[0])
        mask = attention_mask.bool()[:, None, None, :]  # padding is never attended to
        for layer in self.layers:
            x = layer(x, mask)
        return Hidden(x)


class Dinov2Layer(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        width = c.hidden_size
        self.norm1 = nn.LayerNorm(width, eps=c.layer_norm_eps)
        self.attention = SelfAttention(width, c.num_attention_heads, bias=c.qkv_bias)
        self.scale1 = nn.Parameter(torch.ones(width))  # layer scale
        self.norm2 = nn.LayerNorm(width, eps=c.layer_norm_eps)
        self.fc1 = nn.Linear(width, int(width * c.mlp_ratio))
        self.fc2 = nn.Linear(int(width * c.mlp_ratio), width)
        self.scale2 = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.scale1 * self.attention(self.norm1(x))  # pre-norm
        return x + self.scale2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Dinov2(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        grid = c.image_size // c.patch_size  # the position table's side (37 for 518 px / 14)
        self.patch_size = c.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid + 1, c.hidden_size))
        self.patches = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.layers = nn.ModuleList(Dinov2Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> Hidden:
        """pixel_values [batch, 3, height, width], normalised."""
        patches = self.patches(pixel_values).flatten(2).transpose(1, 2)  # [batch, patches, hidden]
        x = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], dim=1)
        x = x + self._positions(*pixel_values.shape[2:])
        for layer in self.layers:
            x = layer(x)
        return Hidden(self.norm(x))

    def _positions(self, height: int, width: int) -> torch.Tensor:
        """[1, 1 + patches, hidden]: the position table, its grid resized bicubically (in float32)
        to this image's grid of patches, as DINOv2 and transformers do it."""
        table = self.position_embeddings
        rows, cols = height // self.patch_size, width // self.patch_size
        side = int((table.shape[1] - 1) ** 0.5)
        if rows == cols == side:
            return table
        grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # [1, hidden, side, side]
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False).to(table.dtype)
        return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


# Checkpoint names -> these modules' names, replaced in order (transformers' saved layout).
RENAMES = {
    "bert": (("embeddings.word_embeddings", "words"), ("embeddings.position_embeddings", "positions"),
             ("embeddings.token_type_embeddings", "token_types"), ("embeddings.LayerNorm", "norm"),
             ("encoder.layer.", "layers."), ("attention.self.", "attention."),
             ("attention.output.dense", "attention.out"), ("attention.output.LayerNorm", "norm1"),
             ("intermediate.dense", "fc1"), ("output.dense", "fc2"), ("output.LayerNorm", "norm2")),
    "dinov2": (("embeddings.cls_token", "cls_token"), ("embeddings.position_embeddings", "position_embeddings"),
               ("embeddings.patch_embeddings.projection", "patches"), ("encoder.layer.", "layers."),
               ("attention.attention.", "attention."), ("attention.output.dense", "attention.out"),
               ("layer_scale1.lambda1", "scale1"), ("layer_scale2.lambda1", "scale2"),
               ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"), ("layernorm.", "norm.")),
}
MODELS = {"bert": Bert, "dinov2": Dinov2}
# What these modules implement; a checkpoint set otherwise (another activation, relative
# positions, SwiGLU, a decoder) goes to transformers. Each is also transformers' default.
REQUIRED = {"hidden_act": "gelu", "position_embedding_type": "absolute", "use_swiglu_ffn": False, "is_decoder": False}
# transformers' defaults, per architecture, for what a config.json may leave out.
DEFAULTS = {"bert": {**REQUIRED, "type_vocab_size": 2, "layer_norm_eps": 1e-12},
            "dinov2": {**REQUIRED, "qkv_bias": True, "mlp_ratio": 4, "num_channels": 3, "layer_norm_eps": 1e-6}}


def load(path: str) -> nn.Module | None:
    """The model in checkpoint folder `path` (config.json + model.safetensors) in eval mode, with
    `.config` read from its config.json; None when these modules do not cover it."""
    folder = Path(path)
    if not ((folder / "config.json").is_file() and (folder / WEIGHTS).is_file()):
        return None
    settings = json.loads((folder / "config.json").read_text())
    model_type = settings.get("model_type")
    if model_type not in MODELS:
        return None
    config = SimpleNamespace(**{**DEFAULTS[model_type], **settings})
    if any(getattr(config, key) != value for key, value in REQUIRED.items()):
        return None
    model = MODELS[model_type](config)
    from safetensors.torch import load_file

    state = {}
    for name, tensor in load_file(folder / WEIGHTS).items():
        name = name.removeprefix(f"{model_type}.")  # a task model's checkpoint nests the base model
        for old, new in RENAMES[model_type]:
            name = name.replace(old, new)
        state[name] = tensor
    wanted = model.state_dict()
    if not wanted.keys() <= state.keys() or any(state[k].shape != v.shape for k, v in wanted.items()):
        return None  # another layout: transformers knows more of them
    model.load_state_dict({name: state[name] for name in wanted})
    model.config = config
    return model.eval()
