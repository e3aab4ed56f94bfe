"""CineMA's masked autoencoder (MAE) around cmrfed's SAX encoder: masking, decoder, loss.

MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022) as CineMA
(mathpluscode/CineMA, ``cinema/mae/mae.py``) adapts it to ConvMAE's conv stem (Gao et al.,
"ConvMAE: Masked Convolution Meets Masked Autoencoders", NeurIPS 2022). Read top-down: the
per-sample token mask, the masked encoder forward, the decoder blocks, the model, size variants.

The encoder is :class:`cmrfed.model.cinema.CineMASaxEncoder` itself, held as ``backbone``: the
MAE only calls its modules in a masked order and never changes their keys or its ``forward``, so
``backbone.state_dict()`` is exactly what ``--backbone PATH`` loads. What masking changes, as in
CineMA:

- a token mask ``(B, N)`` is drawn at the ViT grid (X/16, Y/16, Z), 75 % of the tokens hidden;
- in the conv stem every residual conv block multiplies the input of its depthwise 5x5x5 conv by
  the visible mask upsampled to that stage's resolution, so visible features never mix in
  voxels of hidden patches (the patchifying convs and the 1x1x1 convs cannot leak: kernel =
  stride, or pointwise);
- only the visible tokens enter the transformer (cls first), and only their fusion skips are
  added before the fusion norm;
- the decoder (``dec_linear``, per-token sin-cos table and mask token, cross-attention blocks
  whose queries are the cls token and the mask tokens and whose keys are the visible tokens,
  a norm and a linear pixel head) predicts the voxels of every hidden 16 x 16 x 1 patch, all
  input channels; the loss is the mean squared error over hidden patches only (targets not
  normalised, CineMA's default).

The decoder's own parameters are never exported: CineMA's loader drops them too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cmrfed.model.cinema import (
    EFFECTIVE_PATCH,
    SCALE_FACTOR,
    VIEW,
    VIT_NORM_EPS,
    Attention,
    CineMASaxEncoder,
    ConvBlock,
    Mlp,
    patchify,
    sincos_pos_table,
)
from cmrfed.precision import attention
from cmrfed.seeding import seeded_generator

MASK_RATIO = 0.75


# --- masking ---------------------------------------------------------------------------------------
def random_token_mask(batch: int, n_tokens: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(B, N) bool, True = hidden: per sample, the ``int(N * (1 - ratio))`` tokens with the
    smallest uniform noise stay visible (CineMA's argsort rule), drawn from ``generator``."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    n_keep = int(n_tokens * (1 - ratio))
    noise = torch.rand(batch, n_tokens, generator=generator)
    order = torch.argsort(noise, dim=1)
    mask = torch.ones(batch, n_tokens, dtype=torch.bool)
    mask[:, :n_keep] = False
    return torch.gather(mask, 1, torch.argsort(order, dim=1))


def upsample_mask(mask: torch.Tensor, factor: tuple[int, int, int]) -> torch.Tensor:
    """(B, gx, gy, gz) -> (B, gx*fx, gy*fy, gz*fz): every grid cell repeated over its voxels."""
    for axis, f in enumerate(factor, start=1):
        mask = mask.repeat_interleave(f, dim=axis)
    return mask


def _masked_conv_block(block: ConvBlock, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``ConvBlock.forward`` with the depthwise conv's input zeroed at hidden voxels (ConvMAE)."""
    mixed = block.conv1(block.norm1(x)) * visible.unsqueeze(1).to(x.dtype)
    # channels-last: the same depthwise conv, 2-4x faster backward on CPU
    x = x + block.conv2(block.dw_conv(mixed.contiguous(memory_format=torch.channels_last_3d)))
    return x + block.mlp(block.norm2(x))


def masked_encode(encoder: CineMASaxEncoder, x: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder on the visible tokens only -> (cls (B, D), fused visible tokens (B, K, D)).

    ``mask`` (B, N) True = hidden, every sample hiding the same number of tokens. With nothing
    hidden this is exactly ``encoder(x)`` (a test holds it to that).
    """
    encoder._check_input(x)
    stem = encoder.enc_down_dict[VIEW]
    batch = x.shape[0]
    grid = tuple(s // p for s, p in zip(x.shape[2:], EFFECTIVE_PATCH, strict=True))
    token_mask = mask.reshape(batch, *grid)
    # visible masks at each stage's resolution: stage 1 is grid * (2, 2, 1), stage 0 that * (2, 2, 1)
    stage1 = ~upsample_mask(token_mask, SCALE_FACTOR)  # undoes the ViT patch embedding
    stage0 = upsample_mask(stage1, SCALE_FACTOR)  # undoes the second stage's patchifying conv
    skips = []
    for stage, visible in zip(stem.conv_blocks, (stage0, stage1), strict=True):
        x = stage.patch_embed(x)
        for block in stage.conv:
            x = _masked_conv_block(block, x, visible)
        skips.append(x)
    tokens = stem.linear(stem.patch_embed(x)) + stem.pos_table(grid)  # (B, N, D)
    dim = tokens.shape[-1]
    kept = tokens[~mask].reshape(batch, -1, dim)  # (B, K, D)
    h = torch.cat([encoder.encoder.cls_token.expand(batch, -1, -1), kept], dim=1)
    h = encoder.forward_blocks(h, 0, encoder.depth)
    h = encoder.encoder.norm(h)
    fusion = encoder.enc_fusion_dict[VIEW]
    kept_skips = fusion.project_skips(skips)[~mask].reshape(batch, -1, dim)
    return h[:, 0], fusion(h[:, 1:], kept_skips)


# --- decoder ---------------------------------------------------------------------------------------
class CrossAttention(Attention):
    """Attention whose keys and values come from other tokens (CineMA's decoder, after CrossMAE)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        batch, n_q, dim = x.shape
        n_k = context.shape[1]
        q = self.q(x).reshape(batch, n_q, self.n_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(context).reshape(batch, n_k, 2, self.n_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, scale=self.head_dim**-0.5)
        return self.proj(out.transpose(1, 2).reshape(batch, n_q, dim))


class DecoderBlock(nn.Module):
    """Pre-norm block: queries ``x + attn(norm1(x), context)``, then ``x + mlp(norm2(x))``; the
    context (visible tokens) enters the attention without a norm, as in CineMA."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.attn = CrossAttention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), context)
        return x + self.mlp(self.norm2(x))


@dataclass(frozen=True)
class DecoderSize:
    embed_dim: int
    depth: int
    n_heads: int


DECODER_SIZES: dict[str, DecoderSize] = {
    "tiny": DecoderSize(16, 1, 2),  # CineMA's tiny decoder
    "small": DecoderSize(256, 4, 8),  # CineMA has no small; between its tiny and base
    "base": DecoderSize(512, 8, 16),  # CineMA's (and MAE's) base decoder
}


class MaskedAutoencoder(nn.Module):
    """``backbone`` (the SAX encoder, CineMA keys) + a small decoder that predicts hidden patches.

    ``forward(x, generator)`` draws the mask from ``generator`` and returns ``(loss, pred, mask)``:
    pred (B, N_hidden, 256 * C) for the hidden 16 x 16 x 1 patches in token order.
    """

    def __init__(self, backbone: CineMASaxEncoder, decoder: DecoderSize, mask_ratio: float = MASK_RATIO,
                 seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.mask_ratio = mask_ratio
        dim = decoder.embed_dim
        grid = backbone.grid_size
        self.dec_linear = nn.Linear(backbone.embed_dim, dim)
        self.dec_pos_embed = nn.Parameter(sincos_pos_table(dim, grid), requires_grad=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder = nn.ModuleList([DecoderBlock(dim, decoder.n_heads, backbone.size.mlp_ratio)
                                      for _ in range(decoder.depth)])
        self.dec_norm = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.pred_head = nn.Linear(dim, math.prod(EFFECTIVE_PATCH) * backbone.in_chans)
        self._init_decoder(seeded_generator(seed, "mae-decoder"))

    @torch.no_grad()
    def _init_decoder(self, generator: torch.Generator) -> None:
        """CineMA's init for the decoder (xavier-uniform linears, zero biases, unit norms, mask
        token N(0, 0.02)), seeded; the backbone keeps its own init."""
        for name, module in self.named_modules():
            if name.startswith("backbone"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02, generator=generator)

    def decoder_pos(self, grid: tuple[int, int, int]) -> torch.Tensor:
        if grid == self.backbone.grid_size:
            return self.dec_pos_embed
        return sincos_pos_table(self.dec_pos_embed.shape[-1], grid).to(self.dec_pos_embed.device)

    def predict(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted voxels of the hidden patches, (B, N_hidden, 256 * C), in token order."""
        batch = x.shape[0]
        grid = tuple(s // p for s, p in zip(x.shape[2:], EFFECTIVE_PATCH, strict=True))
        cls, visible = masked_encode(self.backbone, x, mask)
        cls = self.dec_linear(cls).unsqueeze(1)  # (B, 1, d)
        visible = self.dec_linear(visible)  # (B, K, d)
        dim = visible.shape[-1]
        pos = self.decoder_pos(grid).expand(batch, -1, -1)  # (B, N, d)
        context = visible + pos[~mask].reshape(batch, -1, dim)
        queries = self.mask_token + pos[mask].reshape(batch, -1, dim)  # (B, N_hidden, d)
        n_hidden = queries.shape[1]
        h = torch.cat([cls, queries], dim=1)
        for block in self.decoder:
            h = block(h, context)
        return self.pred_head(self.dec_norm(h[:, -n_hidden:]))

    def loss(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(MSE over the hidden patches' voxels, predictions)."""
        pred = self.predict(x, mask)
        target = patchify(x, EFFECTIVE_PATCH)[mask].reshape(pred.shape)
        return F.mse_loss(pred, target), pred

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
        n_tokens = math.prod(s // p for s, p in zip(x.shape[2:], EFFECTIVE_PATCH, strict=True))
        mask = random_token_mask(x.shape[0], n_tokens, self.mask_ratio, generator).to(x.device)
        loss, pred = self.loss(x, mask)
        return loss, pred, mask


def build_mae(backbone: CineMASaxEncoder, mask_ratio: float = MASK_RATIO, seed: int = 0) -> MaskedAutoencoder:
    """The MAE of a backbone, with the decoder size CineMA pairs with the backbone's size."""
    return MaskedAutoencoder(backbone, DECODER_SIZES[backbone.size.name], mask_ratio, seed)
