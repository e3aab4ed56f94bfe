"""CineMA-compatible short-axis (SAX) encoder: conv stem -> shared ViT -> multi-scale fusion.

A re-implementation of the SAX subset of CineMA's ConvViT (CineMA, MIT licence: a masked
autoencoder for cine cardiac MRI; weights ``pretrained/cinema.safetensors`` in the HuggingFace
repository ``mathpluscode/CineMA``) whose state_dict keys are CineMA's own, so the public
pretrained file and CineMA's fine-tuned SAX classifiers load by name. Read top-down: conv stem
blocks, transformer blocks, fusion, the encoder, weight init, ``checkpoint_filter_fn`` and loading,
size variants.

The forward is split so the frozen trunk can be cached: ``embed`` (stem + fusion skips, depends
only on the frozen stem), ``forward_blocks`` (any slice of the 12 transformer blocks) and ``fuse``
(final norms). ``forward(x)`` is exactly ``fuse(forward_blocks(embed(x)[0], 0, 12), embed(x)[1])``.

Not reproduced: CineMA's drop-path (0.1 during its fine-tuning). The backbone here is frozen and
its first blocks are cached, so every block runs deterministically.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmrfed.errors import DataError, UsageError
from cmrfed.model.lora import adapter_group
from cmrfed.precision import attention

logger = logging.getLogger(__name__)

VIEW = "sax"
STEM_PATCH = (4, 4, 1)  # first conv stage: kernel = stride
SCALE_FACTOR = (2, 2, 1)  # second conv stage and the ViT patch embedding
EFFECTIVE_PATCH = (16, 16, 1)  # input voxels per ViT token
DEFAULT_INPUT_SHAPE = (192, 192, 16)
STEM_NORM_EPS = 1e-6
VIT_NORM_EPS = 1e-5

POS_EMBED_KEY = f"enc_down_dict.{VIEW}.pos_embed"
FIRST_CONV_KEY = f"enc_down_dict.{VIEW}.conv_blocks.0.patch_embed.conv.weight"
CLS_TOKEN_KEY = "encoder.cls_token"
HUB_SCHEME = "hf://"


# --- conv stem (``enc_down_dict.sax.``) ------------------------------------------------------------
class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, X, Y, Z) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x.permute(0, 2, 3, 4, 1))
        return x.permute(0, 4, 1, 2, 3).contiguous()


class ConvNormAct(nn.Module):
    """Patchifying conv (kernel = stride, no padding) -> channel LayerNorm -> GELU."""

    def __init__(self, in_chans: int, out_chans: int, patch: tuple[int, int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_chans, out_chans, kernel_size=patch, stride=patch)
        self.norm = ChannelLayerNorm(out_chans, eps=STEM_NORM_EPS)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ConvMlp(nn.Module):
    """1x1x1 conv C -> 4C, exact GELU, 1x1x1 conv 4C -> C."""

    def __init__(self, chans: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(chans, hidden, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(hidden, chans, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvBlock(nn.Module):
    """ConvMAE's residual conv block: a depthwise 5x5x5 mixing path, then a channel MLP."""

    def __init__(self, chans: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(chans, eps=STEM_NORM_EPS)
        self.norm2 = ChannelLayerNorm(chans, eps=STEM_NORM_EPS)
        self.conv1 = nn.Conv3d(chans, chans, kernel_size=1)
        self.conv2 = nn.Conv3d(chans, chans, kernel_size=1)
        self.dw_conv = nn.Conv3d(chans, chans, kernel_size=5, padding="same", groups=chans)
        self.mlp = ConvMlp(chans, chans * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.conv2(self.dw_conv(self.conv1(self.norm1(x))))  # no activation in between
        return x + self.mlp(self.norm2(x))


class ConvStage(nn.Module):
    """One stem stage: a patchifying ConvNormAct then residual conv blocks."""

    def __init__(self, in_chans: int, chans: int, patch: tuple[int, int, int], n_blocks: int,
                 mlp_ratio: int) -> None:
        super().__init__()
        self.patch_embed = ConvNormAct(in_chans, chans, patch)
        self.conv = nn.ModuleList([ConvBlock(chans, mlp_ratio) for _ in range(n_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for block in self.conv:
            x = block(x)
        return x


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B, N, p*q*r*C): tokens in (x, y, z) order with z fastest, each patch
    vector ordered (p, q, r, channel) with channel fastest (CineMA's layout)."""
    batch, chans, size_x, size_y, size_z = x.shape
    p, q, r = patch
    gx, gy, gz = size_x // p, size_y // q, size_z // r
    x = x.reshape(batch, chans, gx, p, gy, q, gz, r)
    x = torch.einsum("nchpwqdr->nhwdpqrc", x)
    return x.reshape(batch, gx * gy * gz, p * q * r * chans)


class PatchEmbed(nn.Module):
    """Linear projection of non-overlapping (2, 2, 1) patches of the last stem stage."""

    def __init__(self, in_chans: int, embed_dim: int, patch: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(in_chans * math.prod(patch), embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(x, self.patch))


def sincos_pos_table(embed_dim: int, grid_size: tuple[int, ...]) -> torch.Tensor:
    """CineMA's fixed sin-cos positional table for a token grid, (1, prod(grid_size), embed_dim).

    Built as CineMA builds it with numpy: ``grid = stack(meshgrid(arange(gx), arange(gy), ...))``
    with numpy's default 'xy' indexing (so the first two axes swap: for a square in-plane grid the
    first chunk encodes the y index, the second the x index), each ``grid[i]`` flattened in C
    order, and per axis a 1-D table ``[sin(pos w_j), cos(pos w_j)]``, ``w_j = 10000^(-j / half)``
    of ``d = embed_dim // n_axes`` (rounded down to even) dims; the remainder is zero-padded.
    Computed in float64, stored as float32.
    """
    axes = np.meshgrid(*[np.arange(size, dtype=np.float64) for size in grid_size])  # 'xy'
    dims = embed_dim // len(grid_size)
    dims -= dims % 2
    half = dims // 2
    omega = np.exp(-np.log(10000.0) * np.arange(half, dtype=np.float64) / half)
    chunks = []
    for axis in axes:
        angles = np.outer(axis.reshape(-1), omega)
        chunks += [np.sin(angles), np.cos(angles)]
    table = np.concatenate(chunks, axis=1)
    pad = embed_dim - table.shape[1]
    if pad:
        table = np.concatenate([table, np.zeros((table.shape[0], pad))], axis=1)
    return torch.from_numpy(table).float().unsqueeze(0)


class DownsampleStem(nn.Module):
    """Conv stem of one view -> (skips, tokens): the stem outputs of both stages and the ViT tokens
    (B, N, D) with the positional table added (no cls token yet)."""

    def __init__(self, in_chans: int, conv_chans: tuple[int, int], embed_dim: int, mlp_ratio: int,
                 grid_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.conv_blocks = nn.ModuleList([
            ConvStage(in_chans, conv_chans[0], STEM_PATCH, n_blocks=2, mlp_ratio=mlp_ratio),
            ConvStage(conv_chans[0], conv_chans[1], SCALE_FACTOR, n_blocks=2, mlp_ratio=mlp_ratio),
        ])
        self.patch_embed = PatchEmbed(conv_chans[1], embed_dim, SCALE_FACTOR)
        self.linear = nn.Linear(embed_dim, embed_dim)
        # fixed, but a Parameter (not a buffer) so its key and place match CineMA's state_dict
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(grid_size), embed_dim),
                                      requires_grad=False)

    def pos_table(self, grid_size: tuple[int, int, int]) -> torch.Tensor:
        """The table for ``grid_size``; another grid interpolates it trilinearly, as CineMA does."""
        if grid_size == self.grid_size:
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        table = self.pos_embed.float().reshape(1, *self.grid_size, dim).movedim(-1, 1)
        table = F.interpolate(table, size=grid_size, mode="trilinear", antialias=False)
        return table.movedim(1, -1).reshape(1, -1, dim).to(self.pos_embed.dtype)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        grid = tuple(s // p for s, p in zip(x.shape[2:], EFFECTIVE_PATCH, strict=True))
        skips = []
        for stage in self.conv_blocks:
            x = stage(x)
            skips.append(x)  # (B, 64, X/4, Y/4, Z), then (B, 128, X/8, Y/8, Z) at base size
        tokens = self.linear(self.patch_embed(x)) + self.pos_table(grid)  # (B, N, D)
        return skips, tokens


# --- shared ViT (``encoder.``) ---------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with separate ``q`` and ``kv`` projections (kv rows: k then v)."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"width {dim} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, dim = x.shape
        q = self.q(x).reshape(batch, n_tokens, self.n_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).reshape(batch, n_tokens, 2, self.n_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = attention(q, k, v, scale=self.head_dim**-0.5)
        return self.proj(out.transpose(1, 2).reshape(batch, n_tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block, no layer-scale: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """The shared transformer: cls token, blocks, final norm (called by the encoder in pieces)."""

    def __init__(self, dim: int, depth: int, n_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([Block(dim, n_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=VIT_NORM_EPS)


# --- fusion (``enc_fusion_dict.sax.``) -------------------------------------------------------------
class MultiScaleFusion(nn.Module):
    """ConvMAE's multi-scale fusion: stem outputs projected to tokens, added to the view tokens, norm."""

    def __init__(self, conv_chans: tuple[int, int], embed_dim: int) -> None:
        super().__init__()
        # each kernel = stride = the downsampling from that stem stage to the token grid
        kernels = ((4, 4, 1), SCALE_FACTOR)
        self.down_convs = nn.ModuleList([
            nn.Conv3d(chans, embed_dim, kernel_size=k, stride=k)
            for chans, k in zip(conv_chans, kernels, strict=True)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=VIT_NORM_EPS)

    def project_skips(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """Sum of the stem outputs projected to the token grid, (B, N, D)."""
        # each (B, D, gx, gy, gz) -> (B, N, D), tokens in (x, y, z) order like the ViT's
        downs = [conv(skip).flatten(2).transpose(1, 2)
                 for skip, conv in zip(skips, self.down_convs, strict=True)]
        return downs[0] + downs[1]

    def forward(self, view_tokens: torch.Tensor, projected_skips: torch.Tensor) -> torch.Tensor:
        return self.norm(view_tokens + projected_skips)


# --- the encoder -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderSize:
    """Width, depth and heads of one size; every size keeps 12 blocks so "the last N of 12" holds."""

    name: str
    embed_dim: int
    depth: int
    n_heads: int
    conv_chans: tuple[int, int]
    mlp_ratio: int = 4


class CineMASaxEncoder(nn.Module):
    """CineMA's SAX encoder; state_dict keys identical to the SAX subset of CineMA's checkpoints.

    Input (B, C, X, Y, Z) with C = 2 (ED, ES frames) by default and X, Y divisible by 16; output
    ``(cls (B, D), view_tokens (B, N, D))`` with N = X/16 * Y/16 * Z. The positional table is built
    from the formula for ``input_shape``; another input shape interpolates it (CineMA's behaviour).

    Norms, as in CineMA's ``ViTEncoder`` and ``MultiScaleFusion``: ``encoder.norm`` applies to all
    tokens after the last block, cls included; the cls token is used as it leaves ``encoder.norm``;
    the view tokens then get the projected stem skips added and go through
    ``enc_fusion_dict.sax.norm``. CineMA adds the two skip projections to the tokens one after the
    other; here they are summed first (``embed`` caches the sum), equal up to float rounding.
    """

    def __init__(self, size: EncoderSize, in_chans: int = 2,
                 input_shape: tuple[int, int, int] = DEFAULT_INPUT_SHAPE, seed: int = 0) -> None:
        super().__init__()
        self.size = size
        self.in_chans = in_chans
        self.input_shape = tuple(input_shape)
        self.grid_size = token_grid(self.input_shape)
        # built on the meta device and initialised from a seeded generator: no global RNG is used
        with torch.device("meta"):
            self.enc_down_dict = nn.ModuleDict({VIEW: DownsampleStem(
                in_chans, size.conv_chans, size.embed_dim, size.mlp_ratio, self.grid_size)})
            self.encoder = ViTEncoder(size.embed_dim, size.depth, size.n_heads, size.mlp_ratio)
            self.enc_fusion_dict = nn.ModuleDict({VIEW: MultiScaleFusion(size.conv_chans, size.embed_dim)})
        allocate(self)
        init_weights(self, torch.Generator().manual_seed(seed))

    @property
    def embed_dim(self) -> int:
        return self.size.embed_dim

    @property
    def depth(self) -> int:
        return len(self.encoder.blocks)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, X, Y, Z) -> (h, skips): h (B, 1+N, D) = tokens entering block 0 (cls first, pos
        added); skips (B, N, D) = summed fusion projections of the stem outputs. Both depend only
        on the frozen stem."""
        self._check_input(x)
        stem_outputs, tokens = self.enc_down_dict[VIEW](x)
        cls = self.encoder.cls_token.expand(x.shape[0], -1, -1)
        h = torch.cat([cls, tokens], dim=1)
        return h, self.enc_fusion_dict[VIEW].project_skips(stem_outputs)

    def forward_blocks(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run ``encoder.blocks[start:stop]`` on tokens h (B, 1+N, D)."""
        if not 0 <= start <= stop <= self.depth:
            raise ValueError(f"block range {start}:{stop} is outside 0:{self.depth}")
        for block in self.encoder.blocks[start:stop]:
            h = block(h)
        return h

    def fuse(self, h: torch.Tensor, skips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens after the last block -> (cls (B, D), fused view tokens (B, N, D))."""
        h = self.encoder.norm(h)
        return h[:, 0], self.enc_fusion_dict[VIEW](h[:, 1:], skips)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, skips = self.embed(x)
        return self.fuse(self.forward_blocks(h, 0, self.depth), skips)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, X, Y, Z), got {tuple(x.shape)}")
        if any(s % p or s < p for s, p in zip(x.shape[2:], EFFECTIVE_PATCH, strict=True)):
            raise ValueError(f"input spatial shape {tuple(x.shape[2:])} must be a multiple of "
                             f"{EFFECTIVE_PATCH}")


def token_grid(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The ViT token grid of an input shape (X, Y, Z); a UsageError if it does not divide."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or any(s < p or s % p for s, p in zip(shape, EFFECTIVE_PATCH, strict=True)):
        raise UsageError(f"input shape {shape} must be three positive multiples of {EFFECTIVE_PATCH} "
                         f"(X, Y divisible by 16), e.g. 192,192,16")
    return tuple(s // p for s, p in zip(shape, EFFECTIVE_PATCH, strict=True))  # type: ignore[return-value]


# --- weight init -----------------------------------------------------------------------------------
def init_default_(module: nn.Linear | nn.Conv3d, generator: torch.Generator) -> None:
    """PyTorch's default init of a linear/conv layer, drawn from ``generator``."""
    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
    if module.bias is not None:
        fan_in = module.weight[0].numel()
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def allocate(module: nn.Module) -> nn.Module:
    """Give a module built on the meta device uninitialised CPU storage, as ``Module.to_empty``.

    ``to_empty`` allocates with ``torch.empty_like``, whose meta-tensor path imports sympy (about
    2 s, in every process that builds a model: each Flower ClientApp message, each study worker);
    ``torch.empty`` of the same shape and dtype allocates the same tensors without it.
    """
    return module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu"))


@torch.no_grad()
def init_weights(model: CineMASaxEncoder, generator: torch.Generator) -> None:
    """CineMA's init, seeded: linear xavier-uniform / zero bias, LayerNorm 1 / 0, convs PyTorch's
    default, cls token N(0, 0.02), pos table from the formula. Modules in a fixed order.

    One departure, for random init only (loaded weights replace it): the biases of the first
    stem conv, the one that sees the image, are intensity thresholds. A channel LayerNorm follows
    that conv; with PyTorch's near-zero default biases its output for a flat patch of intensity c
    is about ``c * W.sum()``, which the LayerNorm maps to one vector for every c > 0, so an
    untrained stem cannot tell blood from myocardium and a frozen random backbone learns nothing.
    PyTorch's default assumes zero-mean inputs; ours are in [0, 1] (the load path rescales ED
    and ES together). So output channel k gets the bias ``-t_k * W_k.sum()``, t_k ~ U(0, 1): it changes
    sign where a flat patch crosses intensity t_k, and the channels together encode brightness
    (random thresholds spread over the input range, as in random-feature models). Drawn last, so
    every other tensor is as before.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight, generator=generator)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv3d):
            init_default_(module, generator)
    nn.init.normal_(model.encoder.cls_token, std=0.02, generator=generator)
    model.enc_down_dict[VIEW].pos_embed.copy_(sincos_pos_table(model.embed_dim, model.grid_size))
    first_conv = model.enc_down_dict[VIEW].conv_blocks[0].patch_embed.conv
    thresholds = torch.empty(first_conv.out_channels).uniform_(0.0, 1.0, generator=generator)
    first_conv.bias.copy_(-thresholds * first_conv.weight.sum(dim=(1, 2, 3, 4)))


# --- checkpoint loading ----------------------------------------------------------------------------
_OTHER_VIEWS = ("lax_2c", "lax_3c", "lax_4c")
_DROP_TAGS = ("mask", "decoder", "dec_", "_head")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor],
                         model: CineMASaxEncoder) -> dict[str, torch.Tensor]:
    """Adapt a CineMA checkpoint (4-view MAE or fine-tuned SAX) to ``model``; every change is logged.

    Drops other views, decoder, mask tokens and heads (keys containing ``mask``, ``decoder``,
    ``dec_``, ``_head`` or a LAX view name); keeps everything else, so keys of a foreign layout
    stay and surface as unexpected. Replaces ``pos_embed`` with the table rebuilt from the formula
    for the model's grid. Repeats a one-channel first conv over the model's input channels (copy,
    no rescale: CineMA's own rule for ED+ES input).
    """
    filtered: dict[str, torch.Tensor] = {}
    dropped = []
    for name, tensor in state_dict.items():
        if any(tag in name for tag in _DROP_TAGS) or set(name.split(".")) & set(_OTHER_VIEWS):
            dropped.append(name)
        elif name == FIRST_CONV_KEY and tensor.ndim == 5 and tensor.shape[1] == 1 and model.in_chans > 1:
            filtered[name] = tensor.repeat(1, model.in_chans, 1, 1, 1)
            logger.info("%s: repeated the 1-channel weight %s over %d input channels (copy)",
                        name, tuple(tensor.shape), model.in_chans)
        elif name != POS_EMBED_KEY:
            filtered[name] = tensor
    if dropped:
        logger.info("dropped %d tensors the SAX encoder does not use (other views, decoder, mask "
                    "tokens, heads)", len(dropped))
    rebuilt = model.enc_down_dict[VIEW].pos_embed.detach().clone()
    stored = state_dict.get(POS_EMBED_KEY)
    if stored is None:
        logger.info("%s: absent; built from the sin-cos formula for grid %s", POS_EMBED_KEY,
                    model.grid_size)
    elif stored.shape == rebuilt.shape:
        gap = (stored.float() - rebuilt).abs().max().item()
        log = logger.warning if gap > 1e-4 else logger.info
        log("%s: rebuilt from the formula for grid %s (max |stored - rebuilt| = %.3g)",
            POS_EMBED_KEY, model.grid_size, gap)
    else:
        logger.info("%s: stored table %s replaced by the formula's for grid %s", POS_EMBED_KEY,
                    tuple(stored.shape), model.grid_size)
    filtered[POS_EMBED_KEY] = rebuilt
    return filtered


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def _load_checked(model: CineMASaxEncoder, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict, with every missing, unexpected or mis-shaped key named in a DataError."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(
        f"{name} {tuple(state_dict[name].shape)} (expected {tuple(expected[name].shape)})"
        for name in set(expected) & set(state_dict) if state_dict[name].shape != expected[name].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"wrong shapes: {_listing(mis_shaped)}")
    if problems:
        raise DataError(f"{source} does not fit a CineMA SAX encoder of size "
                        f"{model.size.name!r}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable safetensors file ({exc}); pass a CineMA "
                        f".safetensors checkpoint or a size (tiny, small, base)") from exc


def _infer_size(state_dict: Mapping[str, torch.Tensor], source: str) -> EncoderSize:
    cls_token = state_dict.get(CLS_TOKEN_KEY)
    if cls_token is None:
        raise DataError(f"{source} is not a CineMA checkpoint: it has no {CLS_TOKEN_KEY} tensor")
    width = cls_token.shape[-1]
    for size in SIZES.values():
        if size.embed_dim == width:
            return size
    widths = ", ".join(f"{s.name}={s.embed_dim}" for s in SIZES.values())
    raise DataError(f"{source}: encoder width {width} matches no known size ({widths})")


def backbone_names() -> tuple[str, ...]:
    """Every backbone named by a word: the sizes (seeded random init) and the shipped files."""
    return (*SIZES, *SHIPPED)


def _hub_parts(spec: str) -> list[str]:
    return spec[len(HUB_SCHEME):].split("/")


def backbone_problem(spec: str) -> str | None:
    """Why ``spec`` names no backbone, or None when it names one: a size, a shipped backbone, an
    existing file or ``hf://owner/repo/file``.

    The one answer to "which backbones exist": the command line's up-front check asks it, and
    :func:`resolve_checkpoint` raises what it says, so the two cannot disagree.
    """
    if spec in SIZES or spec in SHIPPED:
        return None
    if spec.startswith(HUB_SCHEME):
        parts = _hub_parts(spec)
        if len(parts) < 3 or not all(parts):
            return (f"--backbone {spec!r}: write hf://owner/repo/path/to/file.safetensors, e.g. "
                    f"hf://mathpluscode/CineMA/pretrained/cinema.safetensors")
        return None
    if Path(spec).expanduser().is_file():
        return None
    return (f"--backbone {spec!r}: no such file; pass a size ({', '.join(SIZES)}), a shipped backbone "
            f"({', '.join(SHIPPED)}), a path to a CineMA .safetensors file or hf://owner/repo/file")


def resolve_checkpoint(spec: str) -> Path:
    """The local file of a checkpoint spec: a backbone shipped in the package (``SHIPPED``), a
    path, or ``hf://owner/repo/path/in/repo`` downloaded through the optional huggingface_hub
    package."""
    problem = backbone_problem(spec)
    if problem is not None or spec in SIZES:
        raise UsageError(problem or f"--backbone {spec!r}: a size has no checkpoint file")
    if spec in SHIPPED:
        path = SHIPPED_DIR / SHIPPED[spec]
        if not path.is_file():
            raise DataError(f"--backbone {spec!r}: {path} is missing from this installation; "
                            f"reinstall cmrfed, or regenerate it with the pretraining page's commands")
        return path
    if not spec.startswith(HUB_SCHEME):
        return Path(spec).expanduser()
    parts = _hub_parts(spec)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise UsageError(f"--backbone {spec!r} needs the optional huggingface_hub package: "
                         f"pip install 'cmrfed[hub]', or download the file and pass its path") from exc
    try:
        return Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:])))
    except Exception as exc:  # the hub raises many kinds (network, auth, missing entry)
        raise DataError(f"--backbone {spec!r}: download failed ({exc})") from exc


def build_encoder(size: str, in_chans: int = 2, input_shape: tuple[int, int, int] = DEFAULT_INPUT_SHAPE,
                  seed: int = 0) -> CineMASaxEncoder:
    """A randomly initialised encoder of a named size, reproducible from ``seed``."""
    if size not in SIZES:
        raise UsageError(f"unknown backbone size {size!r}; choose one of {', '.join(SIZES)}")
    return CineMASaxEncoder(SIZES[size], in_chans=in_chans, input_shape=input_shape, seed=seed)


def load_backbone(spec: str, input_shape: tuple[int, int, int] = DEFAULT_INPUT_SHAPE, seed: int = 0,
                  in_chans: int = 2) -> CineMASaxEncoder:
    """``tiny|small|base`` (seeded random init), a shipped backbone (``tiny-pretrained``) or a
    CineMA safetensors checkpoint (path or hf://).

    A checkpoint's size is inferred from its width; after :func:`checkpoint_filter_fn` every
    encoder key must be present with the right shape and nothing else may remain (DataError naming
    the keys). Classification heads of a fine-tuned file are not part of the encoder: read them
    with :func:`load_head_from_checkpoint`.
    """
    if spec in SIZES:
        return build_encoder(spec, in_chans=in_chans, input_shape=input_shape, seed=seed)
    path = resolve_checkpoint(spec)
    state_dict = _read_safetensors(path)
    model = CineMASaxEncoder(_infer_size(state_dict, str(path)), in_chans=in_chans,
                             input_shape=input_shape, seed=seed)
    _load_checked(model, checkpoint_filter_fn(state_dict, model), str(path))
    logger.info("loaded a %s CineMA SAX encoder from %s", model.size.name, path)
    return model


HEAD_PREFIX = "pred_head_dict."
HEAD_VIEWS = (VIEW, "cls")


def load_head_from_checkpoint(spec: str) -> dict[str, torch.Tensor]:
    """The classification head of a CineMA fine-tuned SAX file (``pred_head_dict.sax`` / ``.cls``
    weight and bias), or {} when the file has none (the pretrained MAE file's ``pred_head_dict.sax``
    is a pixel-reconstruction head, recognisable by having no ``cls`` companion)."""
    if spec in SIZES:
        return {}
    path = resolve_checkpoint(spec)
    state_dict = _read_safetensors(path)
    names = [f"{HEAD_PREFIX}{view}.{kind}" for view in HEAD_VIEWS for kind in ("weight", "bias")]
    if not all(name in state_dict for name in names):
        return {}
    return {name: state_dict[name] for name in names}


def backbone_fingerprint(encoder: nn.Module) -> str:
    """sha256 over the backbone's state_dict (names, dtypes, shapes, bytes; LoRA adapters excluded).

    Deterministic and unchanged by LoRA injection, so it keys the frozen-trunk cache and records
    in run.json which backbone (weights and input grid) a run used.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        if adapter_group(name) is not None:
            continue
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy())
    return digest.hexdigest()


# --- shipped backbones -----------------------------------------------------------------------------
SHIPPED_DIR = Path(__file__).parent / "weights"
TINY_PRETRAINED = "tiny-pretrained"
SHIPPED: dict[str, str] = {
    # the tiny encoder pretrained by `cmrfed pretrain` on a synthetic cohort of its own (README)
    TINY_PRETRAINED: "tiny_pretrained.safetensors",
}

# --- size variants ---------------------------------------------------------------------------------
SIZES: dict[str, EncoderSize] = {
    "tiny": EncoderSize("tiny", embed_dim=96, depth=12, n_heads=3, conv_chans=(16, 32)),
    "small": EncoderSize("small", embed_dim=384, depth=12, n_heads=6, conv_chans=(32, 64)),
    "base": EncoderSize("base", embed_dim=768, depth=12, n_heads=12, conv_chans=(64, 128)),
}
