"""``central-full``: CineMA's own full fine-tuning on the pooled data, as the upper reference."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import quiet_console
from safetensors.torch import load_file
from torch import nn

from cmrfed import paths
from cmrfed.data.shards import load_manifest
from cmrfed.eval.evaluate_run import evaluate_run
from cmrfed.fed.client import Client, SplitTensors, TrainConfig
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.inprocess import federate
from cmrfed.fed.methods import BACKBONE, HEAD, METHODS
from cmrfed.fed.task import build_run_model
from cmrfed.model.cinema import build_encoder
from cmrfed.model.classifier import CineMAClassifier, layer_id, layer_lr_scale, tensor_group
from cmrfed.model.lora import lora_layers


def test_the_method_table_row():
    spec = METHODS["central-full"]
    assert spec.adapters == () and spec.trains_backbone
    assert spec.trained == {BACKBONE, HEAD} and spec.groups == {BACKBONE, HEAD}
    assert not spec.federated and spec.pooled
    assert not any(s.trains_backbone for name, s in METHODS.items() if name != "central-full")


@pytest.mark.parametrize(("name", "layer"), [
    ("backbone.enc_down_dict.sax.patch_embed.proj.weight", 0),
    ("backbone.enc_fusion_dict.sax.norm.weight", 0),  # CineMA's enc_* modules are layer 0
    ("backbone.encoder.cls_token", 0),
    ("backbone.encoder.blocks.0.attn.q.weight", 1),
    ("backbone.encoder.blocks.11.mlp.fc2.bias", 12),
    ("backbone.encoder.norm.weight", 13),
    ("pred_head_dict.cls.weight", 13),
])
def test_layer_ids_and_scales_are_cinemas(name, layer):
    assert layer_id(name, 12) == layer
    assert layer_lr_scale(name, 12, 0.75) == pytest.approx(0.75 ** (13 - layer))


def test_every_backbone_weight_is_trained_with_decayed_rates_and_no_lora_exists(small_prepared, tmp_path):
    cfg = FederateConfig(data=str(small_prepared), method="central-full", rounds=1, lr=1e-3,
                         batch_size=8, augment_views=2)
    run_model = build_run_model(cfg, tuple(load_manifest(small_prepared).shape))
    assert run_model.start_block == 0  # nothing frozen, nothing cached
    assert list(lora_layers(run_model.model)) == []
    backbone = {n for n, _ in run_model.model.named_parameters() if tensor_group(n) == BACKBONE}
    everything = {n for n, _ in run_model.model.backbone.named_parameters()}
    assert {f"backbone.{n}" for n in everything} - backbone == {"backbone.enc_down_dict.sax.pos_embed"}
    assert backbone <= set(run_model.initial_state)

    out = tmp_path / "full"
    federate(cfg, out, device="cpu", console=quiet_console())
    final = load_file(str(paths.shared_tensors_path(out)))
    assert not any(".adapters." in k for k in final)
    changed = {k for k in backbone if not torch.equal(final[k], run_model.initial_state[k])}
    assert changed == backbone  # every backbone weight moved
    assert "backbone.enc_down_dict.sax.pos_embed" not in final  # the fixed table is not a weight
    records = [json.loads(ln) for ln in paths.rounds_log_path(out).read_text().splitlines()]
    assert all(c["bytes_up"] == 0 and c["bytes_down"] == 0 for r in records for c in r["clients"].values())
    info = json.loads(paths.run_config_path(out).read_text())
    assert info["communication"]["analytic_params_per_message"] == 0
    summary = evaluate_run(out, n_boot=20, device="cpu", console=quiet_console())
    assert set(summary.per_client) == set(info["clients"])


def test_optimizer_groups_follow_cinemas_param_groups():
    encoder = build_encoder("tiny", input_shape=(32, 32, 4), seed=0)
    model = CineMAClassifier(encoder, n_classes=2, seed=0)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if tensor_group(n) is not None}
    split = SplitTensors(("a",), torch.zeros(1, dtype=torch.int64), (torch.zeros(1, 2, 32, 32, 4),))
    client = Client("c", 0, METHODS["central-full"], state, split, None, TrainConfig(weight_decay=0.05), 0)
    params = client._activate(model)
    groups = client._param_groups(model, params)
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert name.endswith("pos_embed")
            continue
        group = by_param[id(param)]
        assert group["lr_scale"] == pytest.approx(layer_lr_scale(name, 12, 0.75))
        assert group["weight_decay"] == (0.0 if param.ndim == 1 else 0.05)
    assert sum(len(g["params"]) for g in groups) == sum(isinstance(p, nn.Parameter) and p.requires_grad
                                                        for p in model.parameters())
