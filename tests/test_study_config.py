"""Study files: every `federate` option is a study key with the same meaning; every bad file is a
UsageError naming the file, the key and what is allowed."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cmrfed.cli import cli
from cmrfed.errors import UsageError
from cmrfed.fed.config import FederateConfig
from cmrfed.fed.methods import METHODS
from cmrfed.options import federate_config
from cmrfed.study import template_text
from cmrfed.study.config import NOT_STUDY_KEYS, load_study, parse_study
from cmrfed.study.plan import plan_cells

MINIMAL = """
[data]
prepared = "prepared"
[grid]
methods = ["duallora", "fedlora"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my-study.toml"
    path.write_text(text, encoding="utf-8")
    return path


def federate_options() -> dict[str, click.Option]:
    return {o.opts[0][2:]: o for o in cli.commands["federate"].params
            if isinstance(o, click.Option) and o.opts[0].startswith("--")}


def cli_config(tmp_path: Path, *args: str):
    """The FederateConfig `cmrfed federate` itself builds from these arguments."""
    command = cli.commands["federate"]
    with command.make_context("federate", ["--data", str(tmp_path / "prepared"), "--out", "-", *args]) as ctx:
        params = dict(ctx.params)
    for key in ("device", "out", "resume", "overwrite"):
        params.pop(key)
    return federate_config(params)


@pytest.mark.parametrize("name", ["example", "demo"])
def test_shipped_templates_parse(tmp_path, name):
    study = parse_study(template_text(name), name, tmp_path)
    assert set(study.methods) == {"duallora", "fedlora", "ffalora"}
    assert study.seeds == (0, 1, 2, 3, 4)
    assert study.compare == {"test": "wilcoxon", "reference": "duallora", "metric": "balanced_accuracy"}
    assert study.prepare is not None and study.prepare["acdc"].startswith(str(tmp_path))
    if name == "example":  # the paper's setting
        assert study.blocks == (2, "all") and study.main_blocks == 2
        assert study.base.backbone == str(tmp_path / "weights" / "cinema.safetensors")
        assert study.holdout == ("canon",) and study.adapt == {"epochs": 3, "lr": None}


def test_readme_study_example_parses_as_the_template_does(tmp_path):
    """The paper.toml the README shows is a valid study with the template's grid and participation."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    text = readme.split("# paper.toml", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    shown = parse_study(text, "README", tmp_path)
    template = parse_study(template_text("example"), "t", tmp_path)
    assert (shown.methods, shown.seeds, shown.blocks, shown.holdout, shown.adapt) == (
        template.methods, template.seeds, template.blocks, template.holdout, template.adapt)


def test_template_cli_prints_both(tmp_path):
    runner = CliRunner()
    example = runner.invoke(cli, ["study", "--template"])
    demo = runner.invoke(cli, ["study", "--template", "demo"])
    assert example.exit_code == 0 and demo.exit_code == 0
    assert example.output == template_text("example") and demo.output == template_text("demo")


# options valid only beside others (DP needs an unweighted loss; delta and clip need a budget)
COMPANIONS = {
    "dp_epsilon": {"class-balanced": False},
    "dp_delta": {"dp-epsilon": 8.0, "class-balanced": False},
    "dp_clip": {"dp-epsilon": 8.0, "class-balanced": False},
}
VALUES = {"dp_epsilon": 8.0, "dp_delta": 1e-6, "dp_clip": 2.0}


def _companion_args(companions: dict) -> list[str]:
    args: list[str] = []
    for key, value in companions.items():
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        else:
            args += [f"--{key}", str(value)]
    return args


def test_every_federate_option_is_a_study_key_with_its_meaning(tmp_path):
    """Generated from the federate command: an option added there is accepted here, unchanged."""
    options = federate_options()
    refused = set(NOT_STUDY_KEYS["federate"]) | {"help"}
    checked = set()
    for key, option in options.items():
        if key in refused or key in ("method", "seed", "blocks", "rank", "device"):
            continue
        default = option.default
        if option.is_flag:
            value, args = (not default), ([option.secondary_opts[0]] if default else [option.opts[0]])
        elif isinstance(option.type, click.Choice):
            value = next(c for c in option.type.choices if c != default)
            args = [option.opts[0], value]
        else:
            value = VALUES.get(option.name, default if default is not None else 2)
            args = [option.opts[0], str(value)]
        companions = COMPANIONS.get(option.name, {})
        extra = "".join(f"{k} = {_toml(v)}\n" for k, v in companions.items())
        text = MINIMAL + f"[federate]\n{key} = {_toml(value)}\n{extra}"
        study = parse_study(text, "s.toml", tmp_path)
        assert study.base == cli_config(tmp_path, *args, *_companion_args(companions)), key
        checked.add(option.name)
    # every field of the run configuration but the data and the grid axes went through a key
    grid = {"data", "method", "seed", "blocks", "rank"}
    assert checked == {f.name for f in fields(FederateConfig)} - grid


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def test_values_mean_what_the_command_line_means(tmp_path):
    text = MINIMAL + """
[federate]
local-epochs = 3
targets = ["q", "kv"]
cache = false
class-balanced = false
lr = 0.01
local-rank = 4
"""
    study = parse_study(text, "s.toml", tmp_path)
    assert study.base == cli_config(tmp_path, "--local-epochs", "3", "--targets", "q,kv", "--no-cache",
                                    "--no-class-balanced", "--lr", "0.01", "--local-rank", "4")


def test_grid_cells_are_the_full_product_with_full_configs(tmp_path):
    text = """
[data]
prepared = "p"
[federate]
rounds = 3
[grid]
methods = ["duallora", "fedlora", "ffalora"]
seeds = [0, 1]
blocks = [1, "all"]
ranks = [2, 8]
[report]
blocks = "all"
rank = 8
"""
    study = parse_study(text, "s.toml", tmp_path)
    cells = plan_cells(study, tmp_path / "p")
    assert len(cells) == 3 * 2 * 2 * 2 and len({c.name for c in cells}) == len(cells)
    assert {c.config.blocks for c in cells} == {1, "all"} and {c.config.rank for c in cells} == {2, 8}
    assert all(c.config.rounds == 3 and c.config.data == str(tmp_path / "p") for c in cells)
    assert (study.main_blocks, study.main_rank) == ("all", 8)


def test_a_study_may_hold_every_method_of_the_table(tmp_path):
    text = f"[data]\nprepared = \"p\"\n[grid]\nmethods = {list(METHODS)!r}\n".replace("'", '"')
    assert set(parse_study(text, "s.toml", tmp_path).methods) == set(METHODS)


TWO = "[grid]\nmethods = ['duallora', 'fedlora']\n"
BAD = [
    ("[federate]\nmethod = 'fedavg'\n", ["[federate] method", "duallora", "fedlora", "ffalora"]),
    ("[federate]\nlocal_epochs = 2\n", ["local_epochs", "local-epochs", "allowed keys"]),
    ("[federate]\nepochs = 2\n", ["'epochs'", "[federate]", "allowed keys", "rounds"]),
    ("[federate]\nrounds = 'many'\n", ["[federate] rounds", "an integer"]),
    ("[federate]\nrounds = 0\n", ["[federate]", "--rounds must be at least 1"]),
    ("[federate]\ncache = 'yes'\n", ["[federate] cache", "true or false"]),
    ("[federate]\nout = 'x'\n", ["[federate] out", "not a study key"]),
    ("[federate]\ncache-dtype = 'float8'\n", ["[federate] cache-dtype", "float32", "bfloat16"]),
    ("[grid]\nmethods = ['duallora', 'fedsgd']\n", ["[grid] methods", "fedsgd", "duallora, fedlora"]),
    ("[grid]\nmethods = ['duallora']\n", ["[grid] methods", "at least one other"]),
    (TWO + "blocks = [2, 'most']\n", ["[grid] blocks", "'all'"]),
    (TWO + "blocks = [0]\n", ["[grid] blocks", "at least 1"]),
    (TWO + "ranks = [8, 0]\n", ["[grid] rank", "at least 1"]),
    (TWO + "seeds = []\n", ["[grid] seeds", "empty"]),
    (TWO + "seeds = [1, 1]\n", ["[grid] seeds", "repeated"]),
    (TWO + "folds = [1]\n", ["'folds'", "[grid]", "methods, seeds"]),
    (TWO + "seeds = [0, 1]\n[federate]\nseed = 3\n", ["seed", "[grid] seeds", "keep one"]),
    ("[grid]\nmethods = ['fedlora', 'ffalora']\n", ["[compare] reference", "duallora", "fedlora, ffalora"]),
    (TWO + "[compare]\ntest = 't-test'\n",
     ["[compare] test", "wilcoxon", "mcnemar", "delong"]),
    (TWO + "[evaluate]\nsplit = 'train'\n", ["[evaluate] split", "test", "val"]),
    (TWO + "[report]\nblocks = 4\n", ["[report] blocks", "allowed: 2"]),
    (TWO + "[report]\ncolour = 'red'\n", ["'colour'", "[report]", "title"]),
    (TWO + "[federation]\nrounds = 2\n", ["'federation'", "[federate]"]),
    (TWO + "[prepare]\nacdc = 'a'\n", ["exactly one of", "[prepare]"]),
    ("[grid]\nmethods = ['duallora', 'fedlora'\n", ["not valid TOML"]),
]


@pytest.mark.parametrize(("body", "expected"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_study_files_name_file_key_and_allowed_values(tmp_path, body, expected):
    text = body if "[data]" in body else "[data]\nprepared = 'p'\n" + body
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_study(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_prepare_table_is_checked_by_the_prepare_command(tmp_path):
    path = write(tmp_path, "[prepare]\nacdc = 'a'\nshape = [64, 64]\n" + TWO)
    with pytest.raises(UsageError, match=re.escape(str(path)) + r".*\[prepare\].*--shape"):
        load_study(path)
    path = write(tmp_path, "[prepare]\nspacing = [1, 1, 10]\n" + TWO)
    with pytest.raises(UsageError, match="names no dataset"):
        load_study(path)


def test_cli_reports_a_bad_study_file_without_traceback(tmp_path):
    path = write(tmp_path, "[data]\nprepared = 'p'\n[grid]\nmethods = ['duallora', 'nope']\n")
    result = CliRunner().invoke(cli, ["study", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(cli, ["study", str(tmp_path / "absent.toml"), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "absent.toml" in missing.output
