"""The CineMA-compatible SAX encoder, checkpoint loading, and the classifier.

Checkpoints are written as random tensors under the exact names and shapes of CineMA's public
pretrained file and of a CineMA fine-tuned SAX classifier (tests/data/*.json), so loading is
tested against the real layouts without the real weights.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import key_table
from safetensors.torch import load_file, save_file

from cmrfed.errors import DataError, UsageError
from cmrfed.model import (
    AdapterSpec,
    CineMAClassifier,
    backbone_fingerprint,
    build_encoder,
    checkpoint_filter_fn,
    inject_lora,
    load_backbone,
    load_head_from_checkpoint,
    param_group,
    sincos_pos_table,
)
from cmrfed.model.cinema import FIRST_CONV_KEY, POS_EMBED_KEY, patchify

TINY_SHAPE = (64, 64, 8)


@pytest.fixture(scope="session")
def base_from_pretrained(pretrained_file: Path):
    return load_backbone(str(pretrained_file), input_shape=(192, 192, 16))


@pytest.fixture()
def tiny():
    return build_encoder("tiny", input_shape=TINY_SHAPE, seed=0).eval()


def _reference_pos_table(embed_dim: int, grid: tuple[int, int, int]) -> np.ndarray:
    """The table as the reference text describes it, written without numpy's meshgrid.

    meshgrid(arange(gx), arange(gy), arange(gz)) in 'xy' indexing has shape (gy, gx, gz) with
    grid[0][a, b, c] = b, grid[1][a, b, c] = a, grid[2][a, b, c] = c; row m of the table is the
    C-order flat index m of (a, b, c).
    """
    gx, gy, gz = grid
    dims = embed_dim // 3 - (embed_dim // 3) % 2
    half = dims // 2
    table = np.zeros((gx * gy * gz, embed_dim))
    for m in range(gx * gy * gz):
        a, rest = divmod(m, gx * gz)
        b, c = divmod(rest, gz)
        for chunk, pos in enumerate((b, a, c)):
            for j in range(half):
                w = 10000.0 ** (-j / half)
                table[m, chunk * dims + j] = math.sin(pos * w)
                table[m, chunk * dims + half + j] = math.cos(pos * w)
    return table


# --- sizes, keys, parameter counts -----------------------------------------------------------------
def test_base_has_cinema_parameter_counts(base_from_pretrained) -> None:
    one_channel = build_encoder("base", in_chans=1)
    assert sum(p.numel() for p in one_channel.parameters()) == 89_490_112
    assert one_channel.enc_down_dict["sax"].pos_embed.numel() == 1_769_472
    vit = sum(p.numel() for n, p in one_channel.named_parameters() if n.startswith("encoder."))
    assert vit == 85_056_768
    # ED+ES input: the first conv has one more input channel of 64 x 4 x 4 x 1 weights
    assert sum(p.numel() for p in base_from_pretrained.parameters()) == 89_490_112 + 1_024


def test_state_dict_is_cinema_sax_subset(base_from_pretrained) -> None:
    finetuned = key_table("cinema_finetuned_sax_keys.json")
    expected = {k: v for k, v in finetuned.items() if not k.startswith("pred_head_dict.")}
    ours = {k: list(v.shape) for k, v in base_from_pretrained.state_dict().items()}
    assert ours == expected
    pos = base_from_pretrained.enc_down_dict["sax"].pos_embed
    assert not pos.requires_grad and POS_EMBED_KEY in base_from_pretrained.state_dict()


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_smaller_sizes_keep_structure(size: str, tiny) -> None:
    encoder = build_encoder(size, input_shape=TINY_SHAPE)
    base_keys = set(key_table("cinema_finetuned_sax_keys.json")) - {
        k for k in key_table("cinema_finetuned_sax_keys.json") if k.startswith("pred_head_dict.")}
    assert set(encoder.state_dict()) == base_keys
    assert len(encoder.encoder.blocks) == 12


# --- loading ---------------------------------------------------------------------------------------
def test_pretrained_file_loads_with_documented_changes(pretrained_file: Path, base_from_pretrained,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    stored = load_file(str(pretrained_file))
    loaded = base_from_pretrained.state_dict()
    for name, tensor in loaded.items():
        if name not in (FIRST_CONV_KEY, POS_EMBED_KEY):
            assert torch.equal(tensor, stored[name]), name
    # first conv (64, 1, 4, 4, 1) repeated over ED and ES by copy
    first = loaded[FIRST_CONV_KEY]
    assert first.shape == (64, 2, 4, 4, 1)
    assert torch.equal(first[:, :1], stored[FIRST_CONV_KEY])
    assert torch.equal(first[:, 1:], stored[FIRST_CONV_KEY])
    # the stored (random) table is replaced by the formula's
    expected_pos = _reference_pos_table(768, (12, 12, 16))
    np.testing.assert_allclose(loaded[POS_EMBED_KEY][0].numpy(), expected_pos, atol=2e-6)

    with caplog.at_level(logging.INFO, logger="cmrfed.model.cinema"):
        checkpoint_filter_fn(stored, base_from_pretrained)
    log = caplog.text
    assert "repeated the 1-channel weight" in log
    assert "dropped" in log and "pos_embed: rebuilt from the formula" in log


def test_finetuned_file_loads_and_its_head_is_separate(finetuned_file: Path, pretrained_file: Path) -> None:
    encoder = load_backbone(str(finetuned_file))
    stored = load_file(str(finetuned_file))
    for name, tensor in encoder.state_dict().items():
        if name != POS_EMBED_KEY:
            assert torch.equal(tensor, stored[name]), name  # 2-channel first conv kept as is
    head = load_head_from_checkpoint(str(finetuned_file))
    assert sorted(head) == ["pred_head_dict.cls.bias", "pred_head_dict.cls.weight",
                            "pred_head_dict.sax.bias", "pred_head_dict.sax.weight"]
    # the pretrained file's pred_head_dict.sax is the MAE reconstruction head, not a classifier
    assert load_head_from_checkpoint(str(pretrained_file)) == {}

    classifier = CineMAClassifier(encoder, n_classes=2)
    classifier.load_head(head, source=str(finetuned_file))
    for name, tensor in head.items():
        assert torch.equal(classifier.state_dict()[name], tensor)


def test_pos_table_follows_reference_text() -> None:
    for dim, grid in ((768, (12, 12, 16)), (128, (2, 3, 4)), (96, (4, 4, 8))):
        ours = sincos_pos_table(dim, grid)[0].numpy()
        np.testing.assert_allclose(ours, _reference_pos_table(dim, grid), atol=2e-6)
    # square grid: chunk 1 encodes y, chunk 2 x, chunk 3 the slice of token (x, y, z), z fastest
    table = sincos_pos_table(768, (12, 12, 16))[0]
    token = (5 * 12 + 7) * 16 + 3  # x = 5, y = 7, z = 3
    one_d = sincos_pos_table(256, (12,))[0]  # 1-D table of 256 dims over positions 0..11
    assert torch.allclose(table[token, :256], one_d[7], atol=1e-6)
    assert torch.allclose(table[token, 256:512], one_d[5], atol=1e-6)
    assert torch.allclose(table[token, 512:], one_d[3], atol=1e-6)
    # a width not divisible into even thirds is zero-padded at the end
    assert torch.count_nonzero(sincos_pos_table(128, (2, 3, 4))[0, :, 126:]) == 0


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path: Path, tiny) -> None:
    state = dict(tiny.state_dict())
    del state["encoder.blocks.3.mlp.fc1.bias"]
    state["encoder.extra.weight"] = torch.zeros(3)
    state["encoder.norm.weight"] = torch.ones(5)
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(DataError) as caught:
        load_backbone(str(path), input_shape=TINY_SHAPE)
    message = str(caught.value)
    assert str(path) in message
    assert "missing keys: encoder.blocks.3.mlp.fc1.bias" in message
    assert "unexpected keys: encoder.extra.weight" in message
    assert "encoder.norm.weight (5,) (expected (96,))" in message


def test_tiny_checkpoint_round_trip(tmp_path: Path) -> None:
    source = build_encoder("tiny", input_shape=TINY_SHAPE, seed=3)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = load_backbone(str(path), input_shape=TINY_SHAPE, seed=99)
    assert backbone_fingerprint(loaded) == backbone_fingerprint(source)


def test_bad_files_and_specs_are_user_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "weights.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    with pytest.raises(DataError, match=re.escape("weights.safetensors is not a readable safetensors")):
        load_backbone(str(garbage))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"blocks.0.weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(DataError, match=re.escape("foreign.safetensors is not a CineMA checkpoint")):
        load_backbone(str(foreign))
    with pytest.raises(UsageError, match="no such file"):
        load_backbone(str(tmp_path / "absent.safetensors"))
    with pytest.raises(UsageError, match="unknown backbone size"):
        build_encoder("huge")


@pytest.mark.skipif(importlib.util.find_spec("huggingface_hub") is not None,
                    reason="huggingface_hub is installed")
def test_hub_spec_without_package_is_usage_error() -> None:
    with pytest.raises(UsageError, match="huggingface_hub"):
        load_backbone("hf://mathpluscode/CineMA/pretrained/cinema.safetensors")
    with pytest.raises(UsageError, match="hf://owner/repo"):
        load_backbone("hf://mathpluscode")


def test_filter_drops_other_views_and_repeats_first_conv() -> None:
    encoder = build_encoder("tiny", in_chans=2, input_shape=TINY_SHAPE)
    state = dict(encoder.state_dict())
    state[FIRST_CONV_KEY] = torch.arange(16 * 4 * 4, dtype=torch.float32).reshape(16, 1, 4, 4, 1)
    state["enc_down_dict.lax_4c.linear.weight"] = torch.zeros(1)
    state["dec_embed_dict.sax.mask_token"] = torch.zeros(1)
    state["decoder.blocks.0.attn.q.weight"] = torch.zeros(1)
    state["pred_head_dict.sax.weight"] = torch.zeros(1)
    state[POS_EMBED_KEY] = torch.zeros(1, 7, 96)
    filtered = checkpoint_filter_fn(state, encoder)
    assert set(filtered) == set(encoder.state_dict())
    assert torch.equal(filtered[FIRST_CONV_KEY][:, 1], state[FIRST_CONV_KEY][:, 0])
    assert torch.equal(filtered[POS_EMBED_KEY], sincos_pos_table(96, (4, 4, 8)))


# --- init, shapes, split forward -------------------------------------------------------------------
def test_init_is_seeded_and_leaves_global_rng_alone() -> None:
    rng_before = torch.random.get_rng_state()
    first = build_encoder("tiny", input_shape=TINY_SHAPE, seed=5).state_dict()
    second = build_encoder("tiny", input_shape=TINY_SHAPE, seed=5).state_dict()
    other = build_encoder("tiny", input_shape=TINY_SHAPE, seed=6).state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["encoder.blocks.0.attn.q.weight"], other["encoder.blocks.0.attn.q.weight"])
    assert all(torch.isfinite(t).all() for t in first.values())


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_stem_keeps_patch_intensity(seed: int) -> None:
    # With near-zero first-conv biases the stem LayerNorm maps every flat patch to one vector
    # (cosine 1.0), so a random backbone cannot see blood vs myocardium; the threshold biases
    # must make a dark and a bright flat patch clearly different.
    stem = build_encoder("tiny", input_shape=(16, 16, 1), seed=seed).enc_down_dict["sax"]
    first = stem.conv_blocks[0].patch_embed
    dark, bright = (first(torch.full((1, 2, 4, 4, 1), value)).flatten() for value in (0.2, 0.9))
    assert torch.cosine_similarity(dark, bright, dim=0) < 0.5


def test_patchify_order_matches_reference() -> None:
    # (B=1, C=2, X=4, Y=2, Z=3) with (2, 2, 1) patches -> grid (2, 1, 3)
    x = torch.arange(2 * 4 * 2 * 3, dtype=torch.float32).reshape(1, 2, 4, 2, 3)
    tokens = patchify(x, (2, 2, 1))
    assert tokens.shape == (1, 6, 8)
    gx, gy, gz = 1, 0, 2  # token (x, y, z) index with z fastest
    token = tokens[0, (gx * 1 + gy) * 3 + gz]
    expected = [x[0, c, gx * 2 + p, gy * 2 + q, gz] for p in range(2) for q in range(2) for c in range(2)]
    assert token.tolist() == torch.stack(expected).tolist()  # (p, q, r, channel), channel fastest


@pytest.mark.parametrize("shape", [(64, 64, 8), (32, 48, 4)])
def test_any_multiple_of_the_patch_works(shape: tuple[int, int, int]) -> None:
    encoder = build_encoder("tiny", input_shape=shape).eval()
    n_tokens = shape[0] // 16 * shape[1] // 16 * shape[2]
    assert encoder.enc_down_dict["sax"].pos_embed.shape == (1, n_tokens, 96)
    with torch.no_grad():
        cls, view = encoder(torch.rand(2, 2, *shape))
        assert cls.shape == (2, 96) and view.shape == (2, n_tokens, 96)
        # another grid than the built one interpolates the table (CineMA's behaviour)
        cls, view = encoder(torch.rand(1, 2, 16, 32, 2))
        assert view.shape == (1, 4, 96)
    with pytest.raises(ValueError, match="multiple of"):
        encoder(torch.rand(1, 2, 24, 32, 2))
    with pytest.raises(UsageError, match="input shape"):
        build_encoder("tiny", input_shape=(100, 64, 8))


def test_base_runs_on_a_small_input(base_from_pretrained) -> None:
    with torch.no_grad():
        cls, view = base_from_pretrained(torch.rand(1, 2, 32, 32, 2))
    assert cls.shape == (1, 768) and view.shape == (1, 8, 768)
    assert torch.isfinite(view).all()


def test_split_forward_composes_to_full_forward(tiny) -> None:
    x = torch.rand(2, 2, *TINY_SHAPE)
    with torch.no_grad():
        full_cls, full_view = tiny(x)
        h, skips = tiny.embed(x)
        assert h.shape == (2, 1 + 128, 96) and skips.shape == (2, 128, 96)
        for k in (0, 4, 10, 12):
            cached = tiny.forward_blocks(h, 0, k)
            cls, view = tiny.fuse(tiny.forward_blocks(cached, k, 12), skips)
            assert torch.equal(cls, full_cls) and torch.equal(view, full_view), k
    with pytest.raises(ValueError, match="block range"):
        tiny.forward_blocks(h, 3, 13)


def test_fuse_applies_encoder_norm_then_fusion_norm(tiny) -> None:
    h = torch.randn(2, 1 + 128, 96)
    skips = torch.randn(2, 128, 96)
    with torch.no_grad():
        tiny.encoder.norm.weight.uniform_(0.5, 1.5)
        cls, view = tiny.fuse(h, skips)
        normed = torch.nn.functional.layer_norm(h, (96,), tiny.encoder.norm.weight,
                                                tiny.encoder.norm.bias, eps=1e-5)
        assert torch.allclose(cls, normed[:, 0], atol=1e-6)
        fused = torch.nn.functional.layer_norm(normed[:, 1:] + skips, (96,), eps=1e-5)
        assert torch.allclose(view, fused, atol=1e-5)


def test_fingerprint_is_deterministic_and_ignores_adapters() -> None:
    first = build_encoder("tiny", input_shape=TINY_SHAPE, seed=0)
    print_first = backbone_fingerprint(first)
    assert print_first == backbone_fingerprint(build_encoder("tiny", input_shape=TINY_SHAPE, seed=0))
    assert print_first != backbone_fingerprint(build_encoder("tiny", input_shape=TINY_SHAPE, seed=1))
    assert print_first != backbone_fingerprint(build_encoder("tiny", input_shape=(32, 32, 8), seed=0))
    inject_lora(first, "all", [AdapterSpec("global", 4, 8.0)], seed=0)
    assert backbone_fingerprint(first) == print_first
    with torch.no_grad():
        first.encoder.norm.bias[0] += 1.0
    assert backbone_fingerprint(first) != print_first


# --- classifier ------------------------------------------------------------------------------------
@pytest.fixture()
def classifier():
    encoder = build_encoder("tiny", input_shape=TINY_SHAPE, seed=0)
    inject_lora(encoder, 2, [AdapterSpec("global", 4, 8.0), AdapterSpec("local", 2, 2.0)], seed=0)
    model = CineMAClassifier(encoder, n_classes=2, seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so the adapters change the output
        for name, param in model.named_parameters():
            if name.endswith(".B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def test_forward_from_cached_blocks_equals_forward(classifier) -> None:
    x = torch.rand(2, 2, *TINY_SHAPE)
    with torch.no_grad():
        logits = classifier(x)
        assert logits.shape == (2, 2)
        h, skips = classifier.backbone.embed(x)
        for k in (0, 10, 12):
            cached = classifier.backbone.forward_blocks(h, 0, k)
            assert torch.equal(classifier.forward_from(cached, skips, k), logits), k


def test_logits_are_the_mean_of_both_heads(classifier) -> None:
    x = torch.rand(2, 2, *TINY_SHAPE)
    with torch.no_grad():
        cls, view = classifier.backbone(x)
        heads = classifier.pred_head_dict
        expected = (heads["sax"](view.mean(dim=1)) + heads["cls"](cls)) / 2
        assert torch.allclose(classifier(x), expected, atol=1e-6)


def test_trainable_tensors_are_adapters_and_head(classifier) -> None:
    names = set(classifier.trainable_state())
    groups = {param_group(n) for n in names}
    assert groups == {"global.A", "global.B", "local.A", "local.B", "head"}
    adapters = {n for n, _ in classifier.named_parameters() if ".adapters." in n}
    heads = {f"pred_head_dict.{v}.{k}" for v in ("sax", "cls") for k in ("weight", "bias")}
    assert names == adapters | heads
    assert len(adapters) == 2 * 5 * 2 * 2  # blocks x targets x adapters x factors
    assert all(n.startswith(("backbone.encoder.blocks.10.", "backbone.encoder.blocks.11.")) for n in adapters)
    assert param_group("backbone.encoder.blocks.0.attn.q.weight") is None

    classifier.set_trainable_groups({"global.B", "head"})  # FFA-LoRA
    assert {param_group(n) for n in classifier.trainable_state()} == {"global.B", "head"}
    with pytest.raises(ValueError, match="match no parameter"):
        classifier.set_trainable_groups({"other.A"})


def test_group_state_round_trip_and_errors(classifier) -> None:
    shared = classifier.group_state({"global.A", "global.B", "head"})
    assert {param_group(n) for n in shared} == {"global.A", "global.B", "head"}
    other = CineMAClassifier(classifier.backbone, n_classes=2, seed=1)
    assert not torch.equal(other.pred_head_dict["cls"].weight, classifier.pred_head_dict["cls"].weight)
    other.load_group_state({k: v for k, v in shared.items() if k.startswith("pred_head_dict.")}, "test")
    assert torch.equal(other.pred_head_dict["cls"].weight, classifier.pred_head_dict["cls"].weight)
    with pytest.raises(DataError, match=re.escape("backbone.encoder.norm.weight")):
        other.load_group_state({"backbone.encoder.norm.weight": torch.zeros(96)}, "test")
    with pytest.raises(DataError, match=re.escape("pred_head_dict.sax.bias")):
        other.load_group_state({"pred_head_dict.sax.bias": torch.zeros(3)}, "test")


def test_head_init_is_seeded() -> None:
    encoder = build_encoder("tiny", input_shape=TINY_SHAPE)
    first = CineMAClassifier(encoder, n_classes=3, seed=4).pred_head_dict.state_dict()
    second = CineMAClassifier(encoder, n_classes=3, seed=4).pred_head_dict.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first["sax.weight"].shape == (3, 96)
