"""The federated engine on real tensors: what each method trains, sends and keeps; FedAvg;
communication accounting; resume after a kill; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch
from conftest import quiet_console
from safetensors.torch import load_file, save_file

from cmrfed import paths
from cmrfed.errors import DataError, UsageError
from cmrfed.fed import inprocess, rounds
from cmrfed.fed.accounting import analytic_shared_params
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.methods import METHODS, resolve_method
from cmrfed.fed.wire import decode
from cmrfed.fed.wire import encode as real_encode
from cmrfed.model.cinema import build_encoder
from cmrfed.model.classifier import CineMAClassifier, param_group
from cmrfed.model.lora import AdapterSpec, inject_lora

FAST = {"rounds": 2, "local_epochs": 1, "batch_size": 8, "rank": 4, "lr": 5e-3}


class PayloadSpy:
    """Records every payload the in-process engine serialises (uploads and downloads)."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    def __call__(self, state):
        payload = real_encode(state)
        self.payloads.append(payload)
        return payload

    def sent_keys(self) -> set[str]:
        return {k for p in self.payloads for k in decode(p)}


def run(prepared: Path, out: Path, monkeypatch=None, **options) -> tuple[Path, PayloadSpy]:
    spy = PayloadSpy()
    if monkeypatch is not None:
        monkeypatch.setattr(inprocess, "encode", spy)
    cfg = FederateConfig(data=str(prepared), **{**FAST, **options})
    inprocess.federate(cfg, out, device="cpu", console=quiet_console())
    return out, spy


def client_states(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every owner's whole state after the last round (from the run's checkpoint)."""
    return rounds.read_checkpoint(run_dir)[1]


def groups_of(keys) -> set[str]:
    return {param_group(k) for k in keys}


def test_duallora_local_tensors_never_travel_and_run_folder_is_complete(small_prepared, tmp_path,
                                                                         monkeypatch):
    out, spy = run(small_prepared, tmp_path / "dual", monkeypatch, method="duallora")
    sent = groups_of(spy.sent_keys())
    assert sent == {"global.A", "global.B", "head"}
    assert not any(".adapters.local." in k for k in spy.sent_keys())
    # artefacts exactly as the contract lists
    for path in (paths.run_config_path(out), paths.rounds_log_path(out),
                 paths.shared_tensors_path(out), paths.checkpoint_dir(out)):
        assert path.exists(), path
    shared = load_file(str(paths.shared_tensors_path(out)))
    assert groups_of(shared) == {"global.A", "global.B", "head"}
    assert not any(k.startswith("backbone.") and ".adapters." not in k for k in shared)
    states = client_states(out)
    for client in json.loads(paths.run_config_path(out).read_text())["clients"]:
        private = load_file(str(paths.private_tensors_path(out, client)))
        assert groups_of(private) == {"local.A", "local.B"}
        # the private file is the client's own local LoRA, trained (B moved away from 0)
        for key, tensor in private.items():
            assert torch.equal(tensor, states[f"client:{client}"][key])
        assert any(t.abs().sum() > 0 for k, t in private.items() if k.endswith(".B"))
    # local LoRAs differ between sites: they were trained on different data
    names = list(load_file(str(paths.private_tensors_path(out, "siemens"))))
    b_key = next(k for k in names if k.endswith(".B"))
    assert not torch.equal(states["client:siemens"][b_key], states["client:canon"][b_key])


def test_ffalora_a_never_changes_and_is_identical_everywhere(small_prepared, tmp_path, monkeypatch):
    out, spy = run(small_prepared, tmp_path / "ffa", monkeypatch, method="ffalora")
    assert groups_of(spy.sent_keys()) == {"global.B", "head"}
    states = client_states(out)
    cfg = FederateConfig(data=str(small_prepared), method="ffalora", **FAST)
    from cmrfed.data.shards import load_manifest
    from cmrfed.fed.task import build_run_model

    initial = build_run_model(cfg, tuple(load_manifest(small_prepared).shape)).initial_state
    a_keys = [k for k in initial if param_group(k) == "global.A"]
    assert a_keys
    for owner, state in states.items():
        if owner.startswith("client:"):
            for key in a_keys:
                assert torch.equal(state[key], initial[key]), (owner, key)
    b_key = next(k for k in initial if param_group(k) == "global.B")
    assert states["client:ge"][b_key].abs().sum() > 0


def test_fedsa_b_never_leaves_and_local_sends_nothing(small_prepared, tmp_path, monkeypatch):
    _, spy = run(small_prepared, tmp_path / "fedsa", monkeypatch, method="fedsa")
    assert groups_of(spy.sent_keys()) == {"global.A", "head"}
    out, spy_local = run(small_prepared, tmp_path / "local", monkeypatch, method="local")
    assert spy_local.payloads == []
    records = [json.loads(ln) for ln in paths.rounds_log_path(out).read_text().splitlines()]
    assert all(c["bytes_up"] == 0 and c["bytes_down"] == 0
               for r in records for c in r["clients"].values())
    assert load_file(str(paths.shared_tensors_path(out))) == {}


def test_server_state_is_the_exact_fedavg_and_bytes_are_the_payload_sizes(small_prepared, tmp_path,
                                                                        monkeypatch):
    out, spy = run(small_prepared, tmp_path / "fedlora", monkeypatch, method="fedlora", rounds=1)
    info = json.loads(paths.run_config_path(out).read_text())
    clients = list(info["clients"])
    uploads, download = spy.payloads[: len(clients)], spy.payloads[len(clients)]
    weights = [info["clients"][c]["n_train"] for c in clients]
    states = [decode(p) for p in uploads]
    server = load_file(str(paths.shared_tensors_path(out)))
    for key, tensor in server.items():
        expected = sum(s[key].double() * w for s, w in zip(states, weights, strict=True)) / sum(weights)
        assert torch.allclose(tensor.double(), expected, atol=1e-7, rtol=0), key
    assert decode(download).keys() == server.keys()
    record = json.loads(paths.rounds_log_path(out).read_text().splitlines()[0])
    analytic = info["communication"]["analytic_params_per_message"]
    for client, payload in zip(clients, uploads, strict=True):
        row = record["clients"][client]
        assert row["bytes_up"] == len(payload)
        assert row["bytes_down"] == len(download)
        assert row["params_up"] == analytic == sum(t.numel() for t in decode(payload).values())


def test_analytic_count_matches_the_reference_formula_at_base_size():
    encoder = build_encoder("base", input_shape=(16, 16, 1), seed=0)
    inject_lora(encoder, 2, [AdapterSpec("global", 8, 16.0)], seed=0)
    model = CineMAClassifier(encoder, n_classes=2, seed=0)
    cfg = FederateConfig(data="unused", method="fedlora", rank=8, blocks=2)
    head = 2 * (768 * 2 + 2)
    analytic = analytic_shared_params(model, resolve_method("fedlora"), cfg, 10, head)
    assert analytic == 2 * 13_056 * 8 + head
    ffa = analytic_shared_params(model, METHODS["ffalora"], cfg, 10, head)
    # FFA-LoRA sends only B: out * r per layer
    assert ffa == 2 * 8 * (768 + 1536 + 768 + 3072 + 768) + head


def test_bad_input_is_a_clear_error_and_writes_nothing(small_prepared, tmp_path):
    with pytest.raises(DataError, match="run `cmrfed prepare` first"):
        run(tmp_path / "nowhere", tmp_path / "r1")
    assert not (tmp_path / "r1").exists()

    tampered = tmp_path / "tampered"
    shutil.copytree(small_prepared, tampered, ignore=shutil.ignore_patterns("cache"))
    with h5py.File(paths.shard_path(tampered, "ge"), "a") as handle:
        handle.attrs["tampered"] = 1
    with pytest.raises(DataError, match=r"ge"):
        run(tampered, tmp_path / "r2")

    with pytest.raises(UsageError, match="unknown --method"):
        FederateConfig(data=str(small_prepared), method="fedprox")
    with pytest.raises(UsageError, match="huge"):
        run(small_prepared, tmp_path / "r3", backbone="huge")

    wrong = tmp_path / "wrong.safetensors"
    save_file({"something.else": torch.zeros(3)}, str(wrong))
    with pytest.raises(DataError, match=r"wrong\.safetensors"):
        run(small_prepared, tmp_path / "r4", backbone=str(wrong))

    existing = tmp_path / "r5"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists"):
        run(small_prepared, existing)
    assert (existing / "keep.txt").read_text() == "mine"


def test_a_client_without_train_subjects_is_refused(small_prepared, tmp_path):
    emptied = tmp_path / "emptied"
    shutil.copytree(small_prepared, emptied, ignore=shutil.ignore_patterns("cache"))
    manifest_file = paths.manifest_path(emptied)
    manifest = json.loads(manifest_file.read_text())
    with h5py.File(paths.shard_path(emptied, "canon"), "a") as handle:
        for name in list(handle["subjects"]):
            if handle["subjects"][name].attrs["split"] == "train":
                handle["subjects"][name].attrs["split"] = "val"
    from cmrfed.atomic import sha256_file

    manifest["shards"]["canon"]["sha256"] = sha256_file(paths.shard_path(emptied, "canon"))
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"canon.*no train subjects"):
        run(emptied, tmp_path / "r")


def test_cli_runs_end_to_end_on_a_cinema_layout_pretrained_file(small_prepared, pretrained_file,
                                                               tmp_path):
    """`cmrfed federate --backbone PATH` with a file in CineMA's public 4-view layout (base size)."""
    from click.testing import CliRunner

    from cmrfed.cli import cli

    out = tmp_path / "base-run"
    result = CliRunner().invoke(cli, [
        "federate", "--data", str(small_prepared), "--method", "duallora", "--blocks", "2",
        "--rank", "2", "--rounds", "1", "--backbone", str(pretrained_file), "--device", "cpu",
        "--augment", "none",  # the layout is the point here; augmented views are tested elsewhere
        "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    info = json.loads(paths.run_config_path(out).read_text())
    assert info["backbone"]["depth"] == 12 and info["backbone"]["first_adapted_block"] == 10
    # two adapted base blocks, rank 2, global LoRA on 5 targets, plus the shared head
    assert info["communication"]["analytic_params_per_message"] == 2 * 13_056 * 2 + 2 * (768 * 2 + 2)
    assert "round   1" in result.output
    again = CliRunner().invoke(cli, ["federate", "--data", str(small_prepared), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    missing = CliRunner().invoke(cli, ["federate", "--data", str(tmp_path / "none"), "--out",
                                       str(tmp_path / "x")])
    assert missing.exit_code == 2 and "cmrfed prepare" in missing.output
