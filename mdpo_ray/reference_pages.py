"""docs/configuration.md and docs/metrics.md, generated from the code that defines them, so they cannot drift.

The configuration page walks the pydantic schemas (mdpo_ray.config.RunConfig, mdpo_ray.sweep_config.SweepConfig):
every dotted key with its type, default, allowed values (Literal choices, bounds, patterns) and its
`Field(description=...)`, a section per nested model introduced by its docstring. The metrics page is
mdpo_ray.training.metrics.GLOSSARY. `mdpo-ray docs` writes both; `mdpo-ray docs --check` lists the pages that
differ from what the code would write; a fast test fails while they differ, so CI does.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from mdpo_ray.config import RunConfig
from mdpo_ray.sweep_config import Domain, SweepConfig
from mdpo_ray.training.metrics import EVAL_PREFIX, EVAL_START_PREFIX, GLOSSARY

DOMAIN_KEY = "space.<key>"  # the dotted name of a search domain's section


@dataclass(frozen=True)
class Section:
    dotted: str  # "" for the top level
    model: type[BaseModel]
    note: str  # the description of the field holding the section, if any
    keys: list[tuple[str, FieldInfo]]  # (dotted key, field) of its leaves


def sections(model: type[BaseModel], prefix: str = "", note: str = "") -> Iterator[Section]:
    """`model`'s leaves as one section, then each nested model's, depth first, in field order."""
    leaves, nested = [], []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = _model_of(info.annotation)
        if sub is not None:
            nested.append((dotted, sub, info.description or ""))
            continue
        leaves.append((dotted, info))
        if model is SweepConfig and name == "space":  # dict[str, Domain]: each value is a Domain section
            nested.append((DOMAIN_KEY, Domain, ""))
    yield Section(prefix.rstrip("."), model, note, leaves)
    for dotted, sub, sub_note in nested:
        yield from sections(sub, f"{dotted}.", sub_note)


def undocumented(schemas: tuple[type[BaseModel], ...] = (RunConfig, SweepConfig)) -> list[str]:
    """Dotted keys of the run and sweep schemas without a description, and sections without a docstring."""
    missing = []
    for schema in schemas:
        for section in sections(schema):
            if not _own_doc(section.model):
                missing.append(f"{section.dotted or schema.__name__} (section docstring)")
            missing += [key for key, info in section.keys if not (info.description or "").strip()]
    return missing


# ------------------------------------------------------------------------------------------ configuration.md


def configuration_page() -> str:
    out = [
        "# Configuration reference",
        "",
        _GENERATED.format(sources="`mdpo_ray/config/` and `mdpo_ray/sweep_config.py`"),
        "",
        ("A run is one YAML file of nested sections (`loss: {beta: 0.3}`) plus `--set key=value` overrides with the "
        "dotted keys below (`--set loss.beta=0.3`; the value is read as YAML); `mdpo-ray config` prints the resolved "
        "config. A key that does not exist or a value outside what is allowed exits with code 2 naming the key, "
        "before Ray starts. `null` is YAML's None. Relative paths are taken from the current directory."),
        "",
        "## Run config (`mdpo-ray train`, `config`, `plan`)",
        "",
        *(line for section in sections(RunConfig) for line in _section(section)),
        "## Sweep config (`mdpo-ray sweep`, `report`)",
        "",
        *(line for section in sections(SweepConfig) for line in _section(section)),
    ]
    return "\n".join(out).rstrip("\n") + "\n"


def _section(section: Section) -> list[str]:
    title = f"`{section.dotted}`" if section.dotted else "Top level"
    intro = " ".join(filter(None, (_own_doc(section.model), section.note)))
    lines = [f"### {title}", "", intro, ""]
    if section.keys:
        lines += ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        lines += [_row(key, info) for key, info in section.keys]
        lines.append("")
    return lines


def _row(key: str, info: FieldInfo) -> str:
    choices: list[Any] = []
    kind = _type(info.annotation, choices)
    allowed = [", ".join(f"`{_yaml(c)}`" for c in choices)] if choices else []
    allowed += [text for item in info.metadata if (text := _bound(item))]
    default = "required" if info.is_required() else f"`{_yaml(info.default)}`"
    cells = (f"`{key}`", f"`{kind}`", default, "; ".join(allowed), info.description or "")
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _type(annotation: Any, choices: list[Any]) -> str:
    """A readable type (YAML words: null, mapping); Literal values go to `choices`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        choices.extend(args)
        return type(args[0]).__name__
    if origin in (typing.Union, types.UnionType):
        return " | ".join(dict.fromkeys(_type(arg, choices) for arg in args))
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is tuple:
        return "[" + ", ".join(_type(arg, choices) for arg in args) + "]"
    if origin is dict:
        return f"mapping of {_type(args[0], choices)} to {_type(args[1], choices)}"
    if origin is list:
        return f"list[{_type(args[0], choices)}]"
    return annotation.__name__


_BOUNDS = ((annotated_types.Ge, "ge", "≥"), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "≤"),
           (annotated_types.Lt, "lt", "<"))


def _bound(item: Any) -> str:
    for kind, attribute, symbol in _BOUNDS:
        if isinstance(item, kind):
            return f"{symbol} {_yaml(getattr(item, attribute))}"
    pattern = getattr(item, "pattern", None)
    return f"matches `{pattern}`" if pattern else ""


def _yaml(value: Any) -> str:
    """A value as it is written in a config file."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("\n...\n").strip()


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model of a section field (`LoraConfig`, or `SearchConfig | None`), else None."""
    candidates = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    found = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    return found[0] if found else None


def _own_doc(model: type[BaseModel]) -> str:
    """The class's own docstring as one paragraph (pydantic's BaseModel docstring does not count)."""
    doc = model.__dict__.get("__doc__")
    return " ".join(inspect.cleandoc(doc).split()) if doc else ""


# ------------------------------------------------------------------------------------------------ metrics.md


def metrics_page() -> str:
    def table(kind: str, head: str) -> list[str]:
        rows = [f"| `{m.name}` | {m.meaning} |" for m in GLOSSARY if m.kind == kind]
        return [f"| {head} | meaning |", "|---|---|", *rows, ""]

    out = [
        "# Metrics",
        "",
        _GENERATED.format(sources="`mdpo_ray/training/metrics.py` (`GLOSSARY`)"),
        "",
        ("The same names in the console, in Ray's reported metrics and in MLflow. Δw = log π(chosen) − "
        "log π_ref(chosen) is the chosen answer's log-prob drift from the reference, Δl the rejected answer's "
        "(summed over completion tokens), β is `loss.beta` and τ `loss.reject_threshold`. A sweep's `metric` may be "
        "any name of the first three tables (with a `scheduler`, not an `eval/` one)."),
        "",
        ("Loss and reward accuracy alone mislead on near-miss pairs: DPO's look best exactly while its answers "
        "collapse. Read Δw, Δl and answer accuracy first."),
        "",
        "## Pair metrics",
        "",
        ("Over every pair of every rank since the last log step (`tracking.log_every_steps`); at step 0, the first "
        f"batch under the untrained policy (MLflow only). `{EVAL_PREFIX}<name>` is the same quantity on the "
        "held-out pairs, at each evaluation (`eval.every_steps`) and at step 0 before training."),
        "",
        *table("pair", "metric"),
        "## Training-step metrics",
        "",
        *table("step", "metric"),
        "## Held-out only",
        "",
        *table("eval", "metric"),
        "## Run tags (not metrics)",
        "",
        ("Data-loading counts are MLflow run tags, one number per run (a column of the runs table, not a chart); "
        "`data/eval_*` only with `data.eval` (the built-in task sets it)."),
        "",
        *table("data_tag", "tag"),
        "## Iterate rounds",
        "",
        ("With `iterate.rounds` > 0 (docs/iterate.md) the iterate run's parent MLflow run gets one point per round, "
        "at step = the round's index (from 0); each round's own run, its child, has the metrics above."),
        "",
        *table("round", "metric"),
        "## Elsewhere",
        "",
        ("- `system/*`: MLflow's system metrics of rank 0's node (`tracking.system_metrics`), named and defined by "
        "MLflow."),
        (f"- Ray's reported metrics (and a sweep's Tune results) also carry `step` and `{EVAL_START_PREFIX}<name>`: "
        "each held-out metric before training, without its `eval/`."),
    ]
    return "\n".join(out) + "\n"


_GENERATED = ("<!-- Generated by `mdpo-ray docs` from {sources}; edit those and run `mdpo-ray docs` "
              "(the tests fail while this page differs). -->")

PAGES: dict[str, Callable[[], str]] = {"configuration.md": configuration_page, "metrics.md": metrics_page}


def write(docs_dir: Path) -> list[Path]:
    docs_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, render in PAGES.items():
        (docs_dir / name).write_text(render(), encoding="utf-8")
        written.append(docs_dir / name)
    return written


def drifted(docs_dir: Path) -> list[Path]:
    """The pages in `docs_dir` that are missing or differ from what the code generates."""
    out = []
    for name, render in PAGES.items():
        path = docs_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render():
            out.append(path)
    return out
