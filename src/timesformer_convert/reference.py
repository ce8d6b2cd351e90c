"""A compact reference implementation of the original TimeSformer, and deterministic synthetic checkpoints.

The model follows the paper (Bertasius et al., "Is Space-Time Attention All You Need for Video Understanding?", ICML
2021) and the original checkpoint layout, so its ``state_dict()`` keys are the original keys without the trainer's
``model.`` prefix. It is written for checking conversions, not for training: no dropout, no drop path, no resizing of
the position or time embeddings. Tokens of one clip are laid out as the original lays them out: the class token, then
patch-major, frame-minor (patch 0 of every frame, then patch 1 of every frame, ...).

Input clips are in the original's order, (batch, channels, frames, height, width).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.nn import functional as F

from .config import DIVIDED, JOINT, SPACE_ONLY, ModelShape

LAYER_NORM_EPS = 1e-6


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, as in ViT."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]
        weights = (query @ key.transpose(-2, -1)) * (dim // self.heads) ** -0.5
        mixed = weights.softmax(dim=-1) @ value
        return self.proj(mixed.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """One transformer block. Divided blocks attend over time first, then over space within each frame."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        dim = shape.hidden_size
        self.attention_type = shape.attention_type
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, shape.num_attention_heads)
        if self.attention_type == DIVIDED:
            self.temporal_norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
            self.temporal_attn = Attention(dim, shape.num_attention_heads)
            self.temporal_fc = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, shape.intermediate_size)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        if self.attention_type != DIVIDED:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

        batch, tokens, dim = x.shape
        patches = (tokens - 1) // frames
        cls, grid = x[:, :1], x[:, 1:]

        # Temporal attention: each patch position attends over its own frames.
        per_patch = grid.reshape(batch * patches, frames, dim)
        temporal = self.temporal_attn(self.temporal_norm1(per_patch)).reshape(batch, patches * frames, dim)
        grid = grid + self.temporal_fc(temporal)

        # Spatial attention: each frame attends over its patches, with its own copy of the class token.
        per_frame = grid.reshape(batch, patches, frames, dim).transpose(1, 2).reshape(batch * frames, patches, dim)
        per_frame = torch.cat((cls.repeat_interleave(frames, dim=0), per_frame), dim=1)
        spatial = self.attn(self.norm1(per_frame))
        spatial_cls = spatial[:, :1].reshape(batch, frames, dim).mean(dim=1, keepdim=True)
        spatial_grid = spatial[:, 1:].reshape(batch, frames, patches, dim).transpose(1, 2).reshape(batch, -1, dim)

        x = torch.cat((cls, grid), dim=1) + torch.cat((spatial_cls, spatial_grid), dim=1)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.proj = nn.Conv2d(3, shape.hidden_size, kernel_size=shape.patch_size, stride=shape.patch_size)


class ReferenceTimeSformer(nn.Module):
    """The original TimeSformer's forward pass, with the original's parameter names."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        dim = shape.hidden_size
        self.shape = shape
        patches = (shape.image_size // shape.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, dim))
        if shape.attention_type != SPACE_ONLY:
            self.time_embed = nn.Parameter(torch.zeros(1, shape.num_frames, dim))
        self.patch_embed = PatchEmbed(shape)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.num_hidden_layers))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(dim, shape.num_labels)

    def embed(self, clip: torch.Tensor) -> torch.Tensor:
        """Turn a (batch, channels, frames, height, width) clip into the token sequence the first block sees."""
        batch, channels, frames, height, width = clip.shape
        images = clip.transpose(1, 2).reshape(batch * frames, channels, height, width)
        tokens = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        tokens = torch.cat((self.cls_token.expand(batch * frames, -1, -1), tokens), dim=1) + self.pos_embed
        if self.shape.attention_type == SPACE_ONLY:
            return tokens

        cls = tokens[:batch, :1]
        patches, dim = tokens.shape[1] - 1, tokens.shape[2]
        grid = tokens[:, 1:].reshape(batch, frames, patches, dim).transpose(1, 2)
        grid = (grid + self.time_embed.unsqueeze(1)).reshape(batch, patches * frames, dim)
        return torch.cat((cls, grid), dim=1)

    def forward(self, clip: torch.Tensor, return_hidden_states: bool = False):
        """Return logits of shape (batch, classes); with ``return_hidden_states``, also the input of every block and
        the output of the last (before the final norm), in the token layout transformers uses."""
        frames = clip.shape[2]
        x = self.embed(clip)
        hidden_states = [x]
        for block in self.blocks:
            x = block(x, frames)
            hidden_states.append(x)
        if self.shape.attention_type == SPACE_ONLY:
            x = x.reshape(clip.shape[0], frames, *x.shape[1:]).mean(dim=1)
        logits = self.head(self.norm(x)[:, 0])
        return (logits, hidden_states) if return_hidden_states else logits


def original_layout(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Return every key of an original state dict for ``shape`` (without prefixes) with its tensor shape."""
    dim, mlp = shape.hidden_size, shape.intermediate_size
    patches = (shape.image_size // shape.patch_size) ** 2
    layout: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, patches + 1, dim),
    }
    if shape.attention_type != SPACE_ONLY:
        layout["time_embed"] = (1, shape.num_frames, dim)
    layout["patch_embed.proj.weight"] = (dim, 3, shape.patch_size, shape.patch_size)
    layout["patch_embed.proj.bias"] = (dim,)
    linear = {"attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim)}
    for block in range(shape.num_hidden_layers):
        parts: dict[str, tuple[int, int] | None] = {"norm1": None, **linear}
        if shape.attention_type == DIVIDED:
            parts.update({"temporal_norm1": None, "temporal_attn.qkv": (3 * dim, dim)})
            parts.update({"temporal_attn.proj": (dim, dim), "temporal_fc": (dim, dim)})
        parts.update({"norm2": None, "mlp.fc1": (mlp, dim), "mlp.fc2": (dim, mlp)})
        for name, weight in parts.items():
            layout[f"blocks.{block}.{name}.weight"] = weight or (dim,)
            layout[f"blocks.{block}.{name}.bias"] = (weight[0],) if weight else (dim,)
    layout.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    layout.update({"head.weight": (shape.num_labels, dim), "head.bias": (shape.num_labels,)})
    return layout


def _seed_for(name: str, seed: int) -> int:
    digest = hashlib.sha256(f"{name}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def synthetic_state_dict(shape: ModelShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic weights in the original layout (no prefix) for ``shape``.

    Each tensor is drawn from its own generator seeded by its key and ``seed``, so a model of fewer blocks holds
    exactly the first blocks of the deeper one. Norm weights sit near 1 and everything else near 0, with scales that
    keep activations of a 12-block model in a useful range; no value is exactly 0 or 1.
    """
    state_dict = {}
    for key, size in original_layout(shape).items():
        generator = torch.Generator().manual_seed(_seed_for(key, seed))
        parts = key.split(".")
        is_norm = len(parts) > 1 and parts[-2] in ("norm", "norm1", "norm2", "temporal_norm1")
        scale = 0.02 if not is_norm else 0.1
        tensor = torch.randn(size, generator=generator) * scale
        if is_norm and key.endswith("weight"):
            tensor += 1.0
        state_dict[key] = tensor
    return state_dict


def synthetic_checkpoint(shape: ModelShape, seed: int = 0) -> dict:
    """Wrap :func:`synthetic_state_dict` the way the original trainer saves checkpoints (``model_state`` with
    ``model.``-prefixed keys, plus epoch, optimizer state and the config as a YAML string)."""
    state_dict = {f"model.{key}": tensor for key, tensor in synthetic_state_dict(shape, seed).items()}
    cfg = f"TIMESFORMER:\n  ATTENTION_TYPE: {shape.attention_type}\nDATA:\n  NUM_FRAMES: {shape.num_frames}\n"
    return {"epoch": 15, "model_state": state_dict, "optimizer_state": {}, "cfg": cfg}


def reference_model(state_dict: dict[str, torch.Tensor], shape: ModelShape) -> ReferenceTimeSformer:
    """Build the reference model for ``shape`` and load ``state_dict`` (original keys, prefixes allowed) strictly."""
    from .rules import strip_prefixes

    model = ReferenceTimeSformer(shape)
    model.load_state_dict({strip_prefixes(key): value for key, value in state_dict.items()}, strict=True)
    return model.eval()


__all__ = [
    "DIVIDED",
    "JOINT",
    "SPACE_ONLY",
    "ReferenceTimeSformer",
    "original_layout",
    "reference_model",
    "synthetic_checkpoint",
    "synthetic_state_dict",
]
