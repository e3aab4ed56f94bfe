"""Bytes per client per round for each method, rank and block setting, next to full fine-tuning.

Run: ``python benchmarks/bench_comm.py [--quick]``. No training: each configuration's model is
built from the seed, a site's :meth:`Client.shared_state` (the one place that decides what leaves
a site) is serialised with the engines' own ``wire.encode``, and the payload is compared with the
analytic count from layer shapes (``runlog.analytic_params_per_message``). FedAvg sends the
aggregate back in the same shape, so a client receives what it sends.
"""

from __future__ import annotations

import torch
from common import Suite, markdown_table, standalone
from rich.console import Console

from cmrfed.fed.client import Client, SplitTensors, TrainConfig
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.runlog import analytic_params_per_message
from cmrfed.fed.task import RunModel, build_run_model
from cmrfed.fed.wire import encode, num_params, tensor_bytes
from cmrfed.model.cinema import POS_EMBED_KEY, build_encoder
from cmrfed.model.classifier import CineMAClassifier, param_group

NAME = "comm"
TITLE = "Communication per client per round"
METHODS = ("duallora", "fedlora", "ffalora", "fedsa")
RANKS = (4, 8, 16)
BLOCKS: tuple[int | str, ...] = (2, "all")


def shared_of(run_model: RunModel, cfg: FederateConfig) -> dict[str, torch.Tensor]:
    """What one site sends, through the engine's own Client (its data is irrelevant here)."""
    placeholder = SplitTensors(subject_ids=("-",), labels=torch.zeros(1, dtype=torch.int64),
                               inputs=(torch.zeros(1),))
    client = Client("site", 0, run_model.spec, run_model.initial_state, placeholder, None,
                    TrainConfig(), cfg.seed)
    return client.shared_state()


def full_finetune_state(size: str, shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """Every encoder tensor (but the fixed sin-cos position table) plus the head: what full
    fine-tuning of the encoder would send each round."""
    model = CineMAClassifier(build_encoder(size, input_shape=shape), n_classes=2)
    return {name: p.detach() for name, p in model.named_parameters()
            if not name.endswith(POS_EMBED_KEY)}


def rows_for(size: str, shape: tuple[int, int, int], console: Console) -> list[list[object]]:
    full = full_finetune_state(size, shape)
    full_params = num_params(full)
    full_bytes = len(encode(full))
    rows: list[list[object]] = [[size, "all (encoder)", "-", "full fine-tuning", len(full),
                                 f"{full_params:,}", f"{full_params:,}", f"{full_bytes:,}",
                                 f"{2 * full_bytes:,}", "100%"]]
    for blocks in BLOCKS:
        for rank in RANKS:
            for method in METHODS:
                cfg = FederateConfig(data="-", method=method, blocks=blocks, rank=rank, backbone=size)
                run_model = build_run_model(cfg, shape)
                shared = shared_of(run_model, cfg)
                analytic = analytic_params_per_message(run_model, cfg)
                payload = len(encode(shared))
                if num_params(shared) != analytic:
                    raise SystemExit(f"{size} {method} blocks={blocks} r={rank}: serialised "
                                     f"{num_params(shared)} != analytic {analytic}")
                head = sum(int(t.numel()) for k, t in shared.items() if param_group(k) == "head")
                rows.append([size, blocks, rank, method, len(shared), f"{num_params(shared):,}",
                             f"{analytic:,} ({head:,} head)", f"{payload:,}", f"{2 * payload:,}",
                             f"{100 * payload / full_bytes:.3f}%"])
                overhead = payload - tensor_bytes(shared)
                console.log(f"{size} blocks={blocks} r={rank} {method}: {payload:,} bytes "
                            f"({overhead:,} of them safetensors header)")
    return rows


def run(suite: Suite) -> str:
    shape = suite.cohort.shape
    rows = [row for size in suite.sizes() for row in rows_for(size, shape, suite.console)]
    columns = ["size", "adapted blocks", "rank", "method", "tensors sent", "params / message",
               "analytic params", "bytes up (= bytes down)", "bytes up + down", "of full FT"]
    return (
        "## Bytes per client per round\n\n"
        "Each row is one real safetensors payload of a site's shared tensors (float32; what both "
        "engines send), built from the seed without training; the analytic column counts r x in "
        "per shared A and out x r per shared B over the adapted layers (q, kv, proj, fc1, fc2), "
        "plus the head when it is shared, and must equal the serialised count (the benchmark stops "
        "otherwise). The server returns the FedAvg aggregate in the same shape, so a client "
        "receives what it sends. Full fine-tuning sends every encoder tensor except the fixed "
        "sin-cos position table, plus the head. duallora's local LoRA and fedsa's B stay on the "
        "site; ffalora sends B only (A is rebuilt from the seed everywhere).\n\n"
        + markdown_table(columns, rows) + "\n"
    )


def main() -> None:
    standalone(NAME, TITLE, run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
