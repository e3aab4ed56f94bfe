"""A study file (TOML) read into one frozen, validated :class:`StudyConfig`.

The keys of ``[federate]``, ``[prepare]``, ``[evaluate]`` and ``[compare]`` are the long option
names of the ``cmrfed`` command of the same name, spelled as on its command line without the
leading ``--`` (``local-epochs = 3``; a ``--x/--no-x`` switch is ``x = true|false``; a
comma-separated option takes a TOML list or the same text). They are not listed here: each table
is parsed by that command's own click parameters and converted by the same function the command
uses, so an option added to ``cmrfed federate`` is a study key the moment it exists, with the same
meaning, default and checks. Every error names the file, the table and the key, and says what is
allowed.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import click

from cmrfed import options as declared
from cmrfed.errors import UsageError
from cmrfed.fed.config import FederateConfig

TABLES = ("data", "prepare", "federate", "grid", "evaluate", "compare", "participation", "adapt", "report")
GRID_KEYS = {"methods": "method", "seeds": "seed", "blocks": "blocks", "ranks": "rank"}
"""Grid axis -> the federate option it varies."""
# options of the commands that say where to write or how to run, not what the result is
NOT_STUDY_KEYS = {
    "federate": {"data": "give the data in [data] or [prepare]",
                 "out": "the study decides each run's folder",
                 "resume": "pass --resume to `cmrfed study`",
                 "overwrite": "pass --overwrite to `cmrfed study`"},
    "prepare": {"out": "the study prepares into STUDY/prepared",
                "overwrite": "pass --overwrite to `cmrfed study`"},
    "evaluate": {"device": "pass --device to `cmrfed study` or set device in [federate]",
                 **dict.fromkeys(("client", "private", "data", "out", "metrics-only", "merge",
                                  "member-run"),
                                 "a study evaluates every site of its own runs; site-by-site "
                                 "evaluation is `cmrfed evaluate --client`")},
    "compare": {"out": "the study writes STUDY/compare/ and STUDY/report/",
                "overwrite": "pass --overwrite to `cmrfed study`"},
    "adapt": {"client": "the sites are [participation] holdout",
              "data": "a held-out site adapts on its shard of the study's data",
              "out": "the study writes STUDY/newcomers/",
              "round": "a site adapts over the round [evaluate] round names, the one it is scored on",
              "overwrite": "pass --overwrite to `cmrfed study`",
              "device": "pass --device to `cmrfed study` or set device in [federate]"},
}
EVALUATE_KEYS = ("split", "which", "threshold", "n_boot")
DATA_KEYS = ("prepared",)
REPORT_KEYS = ("blocks", "rank", "title")
PARTICIPATION_KEYS = ("holdout",)
ADAPT_KEYS = ("epochs", "lr")


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study file declares, resolved: every default filled in, paths absolute."""

    source: str
    title: str
    prepared: str | None  # a PREPARED folder given in [data], or None when the study prepares
    prepare: dict[str, Any] | None  # parsed `prepare` options (without out / overwrite)
    base: FederateConfig  # the fixed federate options (data is a placeholder until prepared)
    device: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    blocks: tuple[int | str, ...]
    ranks: tuple[int, ...]
    evaluate: dict[str, Any]  # split, which, threshold, n_boot
    compare: dict[str, Any]  # test, reference, metric
    main_blocks: int | str
    main_rank: int
    holdout: tuple[str, ...] = ()  # sites each trained without, per method and seed of the main setting
    adapt: dict[str, Any] = field(default_factory=lambda: {"epochs": 3, "lr": None})  # `cmrfed adapt`'s
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def cell_config(self, data: str, method: str, seed: int, blocks: int | str, rank: int) -> FederateConfig:
        """The full FederateConfig of one cell of the grid on the prepared folder ``data``."""
        return replace(self.base, data=data, method=method, seed=seed, blocks=blocks, rank=rank)

    def to_dict(self) -> dict[str, Any]:
        """The resolved study as study.json records it."""
        return {
            "source": self.source, "title": self.title, "prepared": self.prepared,
            "prepare": _jsonable(self.prepare),
            "federate": {k: _jsonable(v) for k, v in self.base.to_dict().items()
                         if k not in ("data", *GRID_KEYS.values())},
            "device": self.device,
            "grid": {"methods": list(self.methods), "seeds": list(self.seeds),
                     "blocks": list(self.blocks), "ranks": list(self.ranks)},
            "evaluate": dict(self.evaluate), "compare": dict(self.compare),
            "participation": {"holdout": list(self.holdout), "adapt": dict(self.adapt)},
            "report": {"blocks": self.main_blocks, "rank": self.main_rank},
        }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --- TOML values -> the command's own click parsing ------------------------------------------


def _command(name: str) -> click.Command:
    """The command whose options a study table holds (the same parameters as the CLI's)."""
    return declared.parser(name)


def _options(command: click.Command) -> dict[str, click.Option]:
    """Study key -> click option: every long option of the command, named without ``--``."""
    keys: dict[str, click.Option] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            longs = [o for o in param.opts if o.startswith("--")]
            if longs:
                keys[longs[0][2:]] = param
    return keys


def _allowed(option: click.Option) -> str:
    if option.is_flag:
        return "true or false"
    if isinstance(option.type, click.Choice):
        return "one of " + ", ".join(map(str, option.type.choices))
    if option.name == "blocks":
        return "a number of blocks or 'all'"
    return {"integer": "an integer", "float": "a number", "text": "text",
            "path": "a path"}.get(option.type.name, option.type.name)


def _where(source: str, table: str, key: str) -> str:
    return f"{source}: [{table}] {key}"


def _argv(source: str, table: str, values: Mapping[str, Any],
          options: Mapping[str, click.Option]) -> list[str]:
    """A table of TOML values as the command line the command would be given."""
    argv: list[str] = []
    for key, value in values.items():
        option = options[key]
        if option.is_flag:
            if not isinstance(value, bool):
                raise UsageError(f"{_where(source, table, key)} = {value!r}: takes true or false")
            if option.secondary_opts:
                argv.append(option.opts[0] if value else option.secondary_opts[0])
            elif value:
                argv.append(option.opts[0])
            continue
        if isinstance(value, bool | dict):
            raise UsageError(f"{_where(source, table, key)} = {value!r}: takes {_allowed(option)}")
        if option.multiple:  # a repeatable option: a TOML list gives it once per value
            for item in value if isinstance(value, list) else [value]:
                argv += [option.opts[0], str(item)]
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        argv += [option.opts[0], str(value)]
    return argv


def _parse_table(source: str, table: str, command_name: str, values: Mapping[str, Any],
                 required: Mapping[str, str] | None = None, positional: Sequence[str] = ()) -> dict[str, Any]:
    """Parse one table with the command's own click parameters; the result is what the command's
    function receives (every default filled in)."""
    command = _command(command_name)
    options = _options(command)
    refused = NOT_STUDY_KEYS.get(table, {})
    allowed = sorted(k for k in options if k not in refused and k not in ("help",))
    for key in values:
        if key in refused:
            raise UsageError(f"{_where(source, table, key)}: not a study key ({refused[key]})")
        if key not in options:
            hint = ""
            if key.replace("_", "-") in options:
                hint = f" (keys are spelled as the command-line options: {key.replace('_', '-')!r})"
            raise UsageError(f"{source}: unknown key {key!r} in [{table}]{hint}; allowed keys: "
                             f"{', '.join(allowed)}")
    argv = _argv(source, table, values, options)
    for key, filler in (required or {}).items():
        if key not in values:
            argv += [options[key].opts[0], filler]
    argv += list(positional)
    try:
        with command.make_context(command_name, argv, resilient_parsing=False) as ctx:
            return dict(ctx.params)
    except click.BadParameter as exc:
        name = exc.param.opts[0][2:] if exc.param is not None else "?"
        allowed_values = f"; allowed: {_allowed(exc.param)}" if isinstance(exc.param, click.Option) else ""
        raise UsageError(f"{_where(source, table, name)}: {exc.format_message()}{allowed_values}") from exc
    except click.ClickException as exc:
        raise UsageError(f"{source}: [{table}]: {exc.format_message()}") from exc


# --- the study file --------------------------------------------------------------------------


def _as_list(source: str, table: str, key: str, value: Any) -> list[Any]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise UsageError(f"{_where(source, table, key)}: an empty list; give at least one value")
    if len(set(map(str, values))) != len(values):
        raise UsageError(f"{_where(source, table, key)} = {value!r}: a value is repeated")
    return values


def _path(base: Path, text: Any) -> str:
    return str((base / Path(str(text)).expanduser()).resolve())


def _is_file_path(backbone: str) -> bool:
    """A backbone given as a file (relative to the study file), not as a name such as ``tiny``
    or ``hf://owner/repo/file``: it has a folder or a suffix."""
    return "://" not in backbone and ("/" in backbone or Path(backbone).suffix != "")


def _federate_config(source: str, where: str, options: Mapping[str, Any], overrides: Mapping[str, Any],
                     key: str) -> FederateConfig:
    """Run the federate command's own conversion; errors name ``where`` / ``key``."""
    merged = {**options, **overrides}
    merged.pop("device", None)
    merged.pop("out", None)
    merged.pop("resume", None)
    merged.pop("overwrite", None)
    try:
        return declared.federate_config(merged)
    except UsageError as exc:
        raise UsageError(f"{source}: [{where}] {key}: {exc}") from exc


def _grid_values(source: str, grid: Mapping[str, Any], federate_raw: Mapping[str, Any],
                 parsed: Mapping[str, Any]) -> dict[str, list[Any]]:
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise UsageError(f"{source}: unknown key {unknown[0]!r} in [grid]; allowed keys: "
                         f"{', '.join(GRID_KEYS)}")
    axes: dict[str, list[Any]] = {}
    for axis, option in GRID_KEYS.items():
        if axis in grid and option in federate_raw:
            raise UsageError(f"{source}: {option} is given both in [federate] and as [grid] {axis}; "
                             "keep one")
        axes[axis] = _as_list(source, "grid", axis, grid[axis]) if axis in grid else [parsed[option]]
    return axes


def _check_grid_value(source: str, axis: str, value: Any) -> Any:
    """Each grid value parsed as its federate option would be; errors name the grid key."""
    option = _options(_command("federate"))[GRID_KEYS[axis]]
    try:
        if isinstance(value, bool):
            raise click.BadParameter(f"{value!r}")
        converted = option.type_cast_value(click.Context(_command("federate")), str(value))
    except click.BadParameter as exc:
        raise UsageError(f"{_where(source, 'grid', axis)} = {value!r}: {exc.format_message()}; allowed: "
                         f"{_allowed(option)} (each value as `cmrfed federate --{GRID_KEYS[axis]}` "
                         "takes it)") from exc
    return converted


def load_study(path: str | Path, base_dir: str | Path | None = None) -> StudyConfig:
    """Read and check a study file; relative paths are relative to ``base_dir`` (default: the
    file's folder)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the study file ({exc.strerror})") from exc
    return parse_study(text, str(path), Path(base_dir) if base_dir else path.resolve().parent)


def parse_study(text: str, source: str, base_dir: Path) -> StudyConfig:
    """Parse study TOML ``text`` (named ``source`` in messages)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: not valid TOML ({exc})") from exc
    for table, value in raw.items():
        if table not in TABLES:
            raise UsageError(f"{source}: unknown table or key {table!r}; allowed tables: "
                             f"{', '.join(f'[{t}]' for t in TABLES)}")
        if not isinstance(value, dict):
            raise UsageError(f"{source}: {table!r} must be a table ([{table}]), not a value")
    data = raw.get("data", {})
    for key in data:
        if key not in DATA_KEYS:
            raise UsageError(f"{source}: unknown key {key!r} in [data]; allowed keys: prepared "
                             "(or give the raw datasets in [prepare])")
    if ("prepared" in data) == ("prepare" in raw):
        raise UsageError(f"{source}: give exactly one of [data] prepared = \"PREPARED\" (a folder "
                         "written by `cmrfed prepare`) or a [prepare] table with the raw datasets")
    prepared = _path(base_dir, data["prepared"]) if "prepared" in data else None
    prepare_options = None
    if "prepare" in raw:
        prep_raw = dict(raw["prepare"])
        for key in ("acdc", "mnms", "mnms2", "tables"):
            if key in prep_raw and isinstance(prep_raw[key], str):
                prep_raw[key] = _path(base_dir, prep_raw[key])
        if "csv" in prep_raw:  # one site CSV or a list of them
            listed = prep_raw["csv"] if isinstance(prep_raw["csv"], list) else [prep_raw["csv"]]
            prep_raw["csv"] = [_path(base_dir, path) for path in listed]
        prepare_options = _parse_table(source, "prepare", "prepare", prep_raw, required={"out": "-"})
        prepare_options.pop("out")
        prepare_options.pop("overwrite")
        if not any(prepare_options[k] for k in ("acdc", "mnms", "mnms2", "csv")):
            raise UsageError(f"{source}: [prepare] names no dataset; give acdc, mnms, mnms2 and/or csv")
        try:  # the triples and split are checked by the prepare command's own conversion
            declared.prepare_options({**prepare_options, "out": "-", "overwrite": False})
        except (UsageError, click.BadParameter) as exc:
            message = exc.format_message() if isinstance(exc, click.BadParameter) else str(exc)
            raise UsageError(f"{source}: [prepare]: {message}") from exc

    federate_raw = dict(raw.get("federate", {}))
    backbone = federate_raw.get("backbone")
    if isinstance(backbone, str) and _is_file_path(backbone):
        federate_raw["backbone"] = _path(base_dir, backbone)
    parsed = _parse_table(source, "federate", "federate", federate_raw,
                          required={"data": prepared or "-", "out": "-"})
    device = str(parsed["device"])
    base = _federate_config(source, "federate", parsed, {}, "(the fixed options)")

    axes = _grid_values(source, raw.get("grid", {}), federate_raw, parsed)
    checked = {axis: [_check_grid_value(source, axis, v) for v in values] for axis, values in axes.items()}
    for axis, values in checked.items():  # each value through the whole federate conversion too
        for value in values:
            _federate_config(source, "grid", parsed, {GRID_KEYS[axis]: value}, f"{axis} = {value!r}")
    configs = {axis: [getattr(_federate_config(source, "grid", parsed, {GRID_KEYS[axis]: v}, axis),
                              GRID_KEYS[axis]) for v in values] for axis, values in checked.items()}

    evaluate = _parse_table(source, "evaluate", "evaluate", raw.get("evaluate", {}), positional=["-"])
    evaluate = {k: evaluate[k] for k in EVALUATE_KEYS}  # what the pooled evaluation takes
    compare = _parse_table(source, "compare", "compare", raw.get("compare", {}),
                           required={"out": "-", "test": "wilcoxon"}, positional=["-"])
    for key in ("runs", "out", "overwrite"):
        compare.pop(key, None)
    if compare["reference"] not in configs["methods"]:
        raise UsageError(f"{_where(source, 'compare', 'reference')} = {compare['reference']!r}: not among "
                         f"the study's methods; allowed: {', '.join(configs['methods'])}")
    if len(configs["methods"]) < 2:
        raise UsageError(f"{_where(source, 'grid', 'methods')}: a study compares methods; give the "
                         "reference and at least one other")

    report = raw.get("report", {})
    for key in report:
        if key not in REPORT_KEYS:
            raise UsageError(f"{source}: unknown key {key!r} in [report]; allowed keys: "
                             f"{', '.join(REPORT_KEYS)}")
    main_blocks = configs["blocks"][0]
    if "blocks" in report:
        main_blocks = _check_grid_value(source, "blocks", report["blocks"])
        main_blocks = _federate_config(source, "report", parsed, {"blocks": main_blocks}, "blocks").blocks
        if main_blocks not in configs["blocks"]:
            raise UsageError(f"{_where(source, 'report', 'blocks')} = {report['blocks']!r}: not in [grid] "
                             f"blocks; allowed: {', '.join(map(str, configs['blocks']))}")
    main_rank = configs["ranks"][0]
    if "rank" in report:
        if report["rank"] not in configs["ranks"]:
            raise UsageError(f"{_where(source, 'report', 'rank')} = {report['rank']!r}: not in [grid] "
                             f"ranks; allowed: {', '.join(map(str, configs['ranks']))}")
        main_rank = int(report["rank"])
    title = str(report.get("title", Path(source).stem))
    holdout, adapt = _participation(source, raw)
    if holdout and base.holdout is not None:
        raise UsageError(f"{source}: holdout is given both in [federate] and in [participation]; a "
                         "study's grid trains every site, its [participation] holdout sites are left "
                         "out one at a time")
    return StudyConfig(
        source=source, title=title, prepared=prepared, prepare=prepare_options, base=base,
        device=device, methods=tuple(configs["methods"]), seeds=tuple(configs["seeds"]),
        blocks=tuple(configs["blocks"]), ranks=tuple(configs["ranks"]),
        evaluate=evaluate, compare=compare, main_blocks=main_blocks, main_rank=main_rank,
        holdout=holdout, adapt=adapt, raw=raw,
    )


def _participation(source: str, raw: Mapping[str, Any]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``[participation] holdout`` (the sites to hold out, one at a time) and the ``[adapt]``
    options each held-out site then adapts with. Site names are checked against the prepared
    data when the study starts, since a study may prepare its data itself."""
    participation = raw.get("participation", {})
    for key in participation:
        if key not in PARTICIPATION_KEYS:
            raise UsageError(f"{source}: unknown key {key!r} in [participation]; allowed keys: "
                             f"{', '.join(PARTICIPATION_KEYS)}")
    if "adapt" in raw and "holdout" not in participation:
        raise UsageError(f"{source}: [adapt] configures the held-out sites; name them with "
                         "[participation] holdout = [\"SITE\", ...]")
    sites: tuple[str, ...] = ()
    if "holdout" in participation:
        values = _as_list(source, "participation", "holdout", participation["holdout"])
        if not all(isinstance(v, str) and v.strip() for v in values):
            raise UsageError(f"{_where(source, 'participation', 'holdout')} = {participation['holdout']!r}: "
                             "takes site names (text), e.g. [\"canon\"]")
        sites = tuple(values)
    parsed = _parse_table(source, "adapt", "adapt", raw.get("adapt", {}),
                          required={"client": "-", "data": "-", "out": "-"}, positional=["-"])
    if parsed["epochs"] < 1:
        raise UsageError(f"{_where(source, 'adapt', 'epochs')} = {parsed['epochs']}: at least 1")
    if parsed["lr"] is not None and not (parsed["lr"] > 0 and math.isfinite(parsed["lr"])):
        raise UsageError(f"{_where(source, 'adapt', 'lr')} = {parsed['lr']}: a positive number "
                         "(leave it out for the run's learning rate)")
    return sites, {k: parsed[k] for k in ADAPT_KEYS}


def grid_settings(study: StudyConfig) -> Sequence[tuple[int | str, int]]:
    """The (blocks, rank) settings of the ablation, in grid order."""
    return [(b, r) for b in study.blocks for r in study.ranks]
