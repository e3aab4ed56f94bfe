"""`cmrfed pretrain` (CineMA's MAE): the masked encoder is the encoder, pretraining learns, its
output loads as --backbone, labels never matter, resume is exact; disease fine-tuning from it;
and the shipped backbone."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
from conftest import SMALL_SHAPE, quiet_console
from safetensors import safe_open
from safetensors.torch import load_file

from cmrfed import paths
from cmrfed.atomic import sha256_file, write_json
from cmrfed.data.augment import AugmentSpec, augment_batch
from cmrfed.errors import UsageError
from cmrfed.model.cinema import (
    POS_EMBED_KEY,
    SHIPPED,
    SHIPPED_DIR,
    TINY_PRETRAINED,
    build_encoder,
    load_backbone,
)
from cmrfed.model.mae import build_mae, masked_encode, random_token_mask
from cmrfed.pretrain import PretrainConfig, PretrainData, augment_stage, pretrain, random_affine

EPOCHS = 6


def small_config(data: Path, **overrides: object) -> PretrainConfig:
    options = {"data": (str(data),), "epochs": EPOCHS, "warmup_epochs": 1, "batch_size": 8,
               "lr": 1e-3, "seed": 4, **overrides}
    return PretrainConfig(**options)  # type: ignore[arg-type]


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


@pytest.fixture(scope="session")
def reference(small_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "reference.safetensors"
    return pretrain(small_config(small_prepared), out, device="cpu", console=quiet_console())


def test_masked_encoder_is_the_encoder_and_never_sees_hidden_patches():
    encoder = build_encoder("tiny", input_shape=(32, 32, 4), seed=1)
    x = torch.rand(2, 2, 32, 32, 4, generator=torch.Generator().manual_seed(0))
    n_tokens = 2 * 2 * 4
    with torch.no_grad():
        cls, tokens = encoder(x)
        cls_m, tokens_m = masked_encode(encoder, x, torch.zeros(2, n_tokens, dtype=torch.bool))
        # equal up to float rounding: the masked path runs the same ops on a differently shaped
        # batch, and multi-threaded kernels may then sum in another order
        torch.testing.assert_close(cls_m, cls, rtol=0, atol=1e-5)
        torch.testing.assert_close(tokens_m, tokens, rtol=0, atol=1e-5)

        mask = random_token_mask(2, n_tokens, 0.75, torch.Generator().manual_seed(1))
        assert mask.sum(dim=1).tolist() == [12, 12]
        # change every voxel of every hidden 16 x 16 x 1 patch: visible outputs must not move
        hidden_voxels = mask.reshape(2, 2, 2, 4).repeat_interleave(16, 1).repeat_interleave(16, 2)
        changed = torch.where(hidden_voxels.unsqueeze(1), torch.rand_like(x), x)
        a = masked_encode(encoder, x, mask)
        b = masked_encode(encoder, changed, mask)
    assert not torch.equal(x, changed)
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], b[1], atol=1e-6)


def test_mae_loss_is_on_hidden_patches_only():
    mae = build_mae(build_encoder("tiny", input_shape=(32, 32, 4), seed=0))
    x = torch.rand(3, 2, 32, 32, 4)
    loss, pred, mask = mae(x, torch.Generator().manual_seed(0))
    assert pred.shape == (3, 12, 16 * 16 * 2)  # 12 of 16 tokens hidden, every voxel of both frames
    assert mask.sum().item() == 36 and loss.ndim == 0 and loss.item() > 0


def test_augmentation_keeps_shape_and_range_and_is_identity_when_off():
    images = torch.rand(4, 2, 32, 32, 4)
    images[:, :, 0, 0, 0] = 0.0
    images[:, :, 1, 1, 1] = 1.0
    off = random_affine(images, (4.0, 4.0, 10.0), PretrainConfig(data=("x",), aug_prob=0.0),
                        torch.Generator().manual_seed(0))
    assert torch.allclose(off, images)
    on = random_affine(images, (4.0, 4.0, 10.0), PretrainConfig(data=("x",), aug_prob=1.0),
                       torch.Generator().manual_seed(0))
    assert on.shape == images.shape and on.min() >= 0 and on.max() <= 1
    assert not torch.allclose(on, images)


def test_each_stage_draws_cinemas_augmentation_of_that_stage():
    """MAE: CineMA's pretraining affine; disease: the sites' fine-tuning augmentation, one seed per
    sample from the stage's generator; none: the images as prepared."""
    images = torch.rand(3, 2, 32, 32, 4)
    data = PretrainData(images, torch.tensor([0, 1, 0]), (4.0, 4.0, 10.0), (32, 32, 4), [])
    mae = PretrainConfig(data=("x",), aug_prob=1.0)
    assert torch.equal(augment_stage(images, data, mae, torch.Generator().manual_seed(1)),
                       random_affine(images, data.spacing, mae, torch.Generator().manual_seed(1)))
    disease = PretrainConfig(data=("x",), objective="disease")
    seeds = torch.randint(0, 2**62, (3,), generator=torch.Generator().manual_seed(1)).tolist()
    assert torch.equal(augment_stage(images, data, disease, torch.Generator().manual_seed(1)),
                       augment_batch(images, seeds, AugmentSpec()))
    for objective in ("mae", "disease"):
        off = PretrainConfig(data=("x",), objective=objective, augment="none")
        assert augment_stage(images, data, off, torch.Generator().manual_seed(1)) is images
    with pytest.raises(UsageError, match="--augment 'gamma'"):
        PretrainConfig(data=("x",), augment="gamma")


def test_pretraining_lowers_the_masked_loss_and_loads_as_backbone(reference: Path):
    meta = metadata_of(reference)
    assert float(meta["loss_end"]) < float(meta["loss_start"])
    losses = json.loads(meta["train_loss_per_epoch"])
    assert len(losses) == EPOCHS and losses[-1] < losses[0]
    assert json.loads(meta["data"])[0]["manifest_sha256"]
    assert meta["seed"] == "4" and meta["command"].startswith("cmrfed pretrain --data ")
    assert json.loads(meta["recipe"])["mask_ratio"] == 0.75

    saved = tensors_of(reference)
    encoder = load_backbone(str(reference), input_shape=SMALL_SHAPE, seed=99)
    state = encoder.state_dict()
    assert set(saved) == set(state) - {POS_EMBED_KEY}
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    initial = build_encoder("tiny", input_shape=SMALL_SHAPE, seed=4).state_dict()  # the run's init
    assert not torch.equal(saved["enc_down_dict.sax.linear.weight"],
                           initial["enc_down_dict.sax.linear.weight"])


def _garble_labels(source: Path, target: Path) -> None:
    """A copy of a prepared folder with every label attr deleted from the shards and the
    manifest's labels and pathologies flipped (shard checksums updated so it stays valid)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(paths.CACHE_DIR))
    manifest = json.loads(paths.manifest_path(target).read_text())
    for client in manifest["shards"]:
        shard = paths.shard_path(target, client)
        with h5py.File(shard, "r+") as handle:
            for group in handle["subjects"].values():
                for attr in ("label", "pathology"):
                    del group.attrs[attr]
        manifest["shards"][client]["sha256"] = sha256_file(shard)
    for subject in manifest["subjects"]:
        subject["label"] = 1 - int(subject["label"])
        subject["pathology"] = "garbled"
    write_json(paths.manifest_path(target), manifest)


def test_labels_are_never_read(small_prepared: Path, reference: Path, tmp_path: Path):
    garbled = tmp_path / "garbled"
    _garble_labels(small_prepared, garbled)
    out = pretrain(small_config(garbled), tmp_path / "garbled.safetensors", device="cpu",
                   console=quiet_console())
    a, b = tensors_of(reference), tensors_of(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_kill_equals_an_uninterrupted_run(small_prepared: Path, reference: Path,
                                                         tmp_path: Path):
    out = tmp_path / "killed.safetensors"
    args = [sys.executable, "-m", "cmrfed.cli", "pretrain", "--data", str(small_prepared),
            "--epochs", str(EPOCHS), "--warmup-epochs", "1", "--batch-size", "8", "--seed", "4",
            "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    progress = paths.pretrain_checkpoint_dir(out) / "progress.json"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if progress.exists() and json.loads(progress.read_text())["epoch"] >= 2:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = json.loads(progress.read_text())["epoch"]
    assert 2 <= done < EPOCHS, "the run should have been killed mid-way"
    assert not out.exists()

    subprocess.run([*args, "--resume"], check=True, env=env, stdout=subprocess.DEVNULL)
    a, b = tensors_of(reference), tensors_of(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metadata_of(out)["train_loss_per_epoch"] == metadata_of(reference)["train_loss_per_epoch"]


def test_disease_fine_tuning_starts_from_the_mae_output_and_records_it(
        small_prepared: Path, reference: Path, tmp_path: Path):
    cfg = small_config(small_prepared, objective="disease", init=str(reference), epochs=2)
    out = pretrain(cfg, tmp_path / "tuned.safetensors", device="cpu", console=quiet_console())
    meta = metadata_of(out)
    assert meta["objective"] == "disease" and len(json.loads(meta["train_loss_per_epoch"])) == 2
    assert meta["init_sha256"] == sha256_file(reference)
    assert meta["init_command"] == metadata_of(reference)["command"]
    assert f"--objective disease --init {reference} --layer-decay 0.75" in meta["command"]
    tuned, start = tensors_of(out), tensors_of(reference)
    assert set(tuned) == set(start)
    assert not torch.equal(tuned["encoder.blocks.0.attn.q.weight"], start["encoder.blocks.0.attn.q.weight"])
    load_backbone(str(out), input_shape=SMALL_SHAPE)


def test_bad_options_are_clear_errors(small_prepared: Path, reference: Path, tmp_path: Path):
    with pytest.raises(UsageError, match=r"BACKBONE\.safetensors"):
        pretrain(small_config(small_prepared), tmp_path / "out.pt", console=quiet_console())
    with pytest.raises(UsageError, match="already exists"):
        pretrain(small_config(small_prepared), reference, console=quiet_console())
    with pytest.raises(UsageError, match="differ from the checkpoint"):
        pretrain(small_config(small_prepared, seed=5), reference, resume=True, console=quiet_console())
    with pytest.raises(UsageError, match="--size"):
        small_config(small_prepared, size="huge")
    with pytest.raises(UsageError, match="a tiny encoder, but --size small"):
        pretrain(small_config(small_prepared, size="small", init=str(reference), objective="disease"),
                 tmp_path / "x.safetensors", console=quiet_console())


def test_shipped_backbone_loads_by_name_and_says_how_it_was_made():
    path = SHIPPED_DIR / SHIPPED[TINY_PRETRAINED]
    assert path.stat().st_size < 4_000_000
    saved = tensors_of(path)
    assert {t.dtype for t in saved.values()} == {torch.float16}
    meta = metadata_of(path)
    assert meta["kind"] == "cmrfed pretrained backbone" and meta["size"] == "tiny"
    assert meta["command"].startswith("cmrfed pretrain ")
    assert float(meta["loss_end"]) < float(meta["loss_start"])
    encoder = load_backbone(TINY_PRETRAINED, input_shape=(64, 64, 8))
    random = load_backbone("tiny", input_shape=(64, 64, 8))
    assert encoder.size.name == "tiny"
    name = "encoder.blocks.0.attn.q.weight"
    assert torch.equal(encoder.state_dict()[name], saved[name].float())
    assert not torch.equal(encoder.state_dict()[name], random.state_dict()[name])
    # the pretraining page's regeneration recipe holds exactly the two commands the file records
    page = (Path(__file__).parents[1] / "docs" / "pretraining.md").read_text(encoding="utf-8")
    recipe = page.split("cp tiny_pretrained.safetensors cmrfed/model/weights", 1)[0]
    recipe = re.sub(r" \\\n +", " ", recipe)  # the page's continued lines as one
    assert meta["objective"] == "disease" and meta["init_command"].startswith("cmrfed pretrain ")
    assert meta["command"] in recipe and meta["init_command"] in recipe
