"""The sweep schema: a base run config plus a search space over dotted run-config keys.

Every search key and every value it can take is checked against the run schema at load time, so a
typo (`loss.betta`) or an impossible value (`loss.reject_threshold: {grid: [0.5]}`) fails before Ray
is asked for anything. No Ray import here: the Tune objects are built in sweep.py and sweep_trial.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mdpo_ray.config import ConfigError, RunConfig, parse_override, set_dotted, validate_config
from mdpo_ray.training.metrics import EVAL_PREFIX, GLOSSARY, METRIC_NAMES


def _names(kind: str) -> str:
    return ", ".join(m.name for m in GLOSSARY if m.kind == kind)


# What a sweep's `metric` may be (METRIC_NAMES), said in a line.
ALLOWED_METRICS = (f"{_names('pair')} (each also as {EVAL_PREFIX}<name>, on the held-out pairs); {_names('step')}; "
                   f"{_names('eval')}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Domain(_Strict):
    """Exactly one of: grid (every value, crossed with the other grids), choice, uniform, loguniform.

    A grid or choice over a section (`loss: {grid: [{name: dpo, beta: 0.1}, {name: sft}]}`) lists
    variants: each mapping sets those keys of the section together, so a grid need not cross keys
    that do not combine (sft has no beta to sweep). Over `run` (RUN_VARIANTS), the whole run config,
    a variant may set keys of several sections (`{loss: {name: sft}, iterate: {rounds: 0}}`).
    """

    grid: list[Any] | None = Field(None, description="Every value, each crossed with every value of the other "
                                   "grids (a grid search; not with `search:`).")
    choice: list[Any] | None = Field(None, description="One value drawn at random per sample (or picked by the "
                                     "search algorithm).")
    uniform: tuple[float, float] | None = Field(None, description="`[low, high]`: a float drawn uniformly.")
    loguniform: tuple[float, float] | None = Field(None, description="`[low, high]`, low > 0: a float drawn "
                                                   "uniformly in log space (learning rates).")

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        values = self.grid if self.grid is not None else self.choice
        if values is not None and not values:
            raise ValueError("an empty list searches nothing")
        low_high = self.uniform or self.loguniform
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"the range must be [low, high] with low < high (got {list(low_high)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    def probe_values(self) -> list[Any]:
        """Values that must all make a valid run config: every listed value, or both range ends."""
        if self.grid is not None or self.choice is not None:
            return list(self.grid if self.grid is not None else self.choice)
        low, high = self.uniform or self.loguniform
        return [low, high]


# The space key whose variants are mappings over the whole run config, any sections at once.
RUN_VARIANTS = "run"


class SearchConfig(_Strict):
    """A search algorithm that picks each trial's values from the results so far; it cannot use grid domains."""

    algorithm: Literal["optuna"] = Field("optuna", description="Optuna's TPE sampler through Ray Tune; needs the "
                                         "`optuna` extra (`pip install 'mdpo-ray[optuna]'`).")
    seed: int | None = Field(None, description="Seed of the sampler; null: unseeded.")


class AshaConfig(_Strict):
    """ASHA (asynchronous successive halving) cuts trials that trail at each rung."""

    grace_period: int = Field(1, ge=1, description="Reports (`tracking.log_every_steps` apart) a trial runs before "
                              "it can be cut.")
    reduction_factor: float = Field(2.0, gt=1, description="At each rung only the best 1/reduction_factor of the "
                                    "trials continue; the rungs are grace_period × reduction_factor^k reports.")


class SchedulerConfig(_Strict):
    """A trial scheduler that stops trailing trials early on `metric`, which must then be in every report (not an
    `eval/` one)."""

    asha: AshaConfig = Field(description="ASHA's settings (the only scheduler).")


class SweepConfig(_Strict):
    """The top-level keys of a sweep YAML (`mdpo-ray sweep FILE`): a base run config plus a search space over
    dotted run-config keys. Every search key and every value it can take is validated against the run schema
    when the file is loaded, before Ray starts."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="The sweep's name: Tune experiment, "
                      "MLflow experiment and parent run, and the folder under the runs' `output_dir`; `--resume` "
                      "finds an interrupted sweep by it.")
    base: str | None = Field(None, description="A run YAML the trials start from, relative to the sweep file; "
                             "null: the run defaults.")
    run: dict[str, Any] = Field({}, description="Run-config keys over `base` (the same schema as `mdpo-ray "
                                "train`), as nested sections.")
    space: dict[str, Domain] = Field(description="Dotted run-config key (`loss.beta`) or section (`loss`) -> its "
                                     "domain: exactly one of the `space.<key>.*` entries. A grid or choice over a "
                                     "section lists variants whose keys are set together; over `run`, variants "
                                     "of the whole run config, whose keys may span sections "
                                     "(`run: {grid: [{loss: {name: sft}, optim.max_steps: 300}]}`).")
    num_samples: int = Field(1, ge=1, description="Repeats of the whole grid; each repeat draws the choice and range "
                             "domains afresh.")
    metric: str = Field("eval/answer_accuracy", description="The metric that ranks the trials (and drives `search` and "
                        "`scheduler`): any metric a run logs, i.e. any name in the metric tables of docs/metrics.md "
                        "(a training metric such as `rewards/margins`, or an `eval/` one such as "
                        "`eval/rewards/margins`); not the `data/*` run tags (one count per run) nor MLflow's "
                        "`system/*`. With `scheduler`, not an `eval/` metric.")
    mode: Literal["max", "min"] = Field("max", description="Whether a higher or a lower `metric` is better.")
    search: SearchConfig | None = Field(None, description="Optional; null: the grid and random draws only.")
    scheduler: SchedulerConfig | None = Field(None, description="Optional; null: every trial runs to its end "
                                              "(or its `stop.*`).")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Trials running at once; null: as many as "
                                              "the cluster's CPUs (GPUs) fit, a trial taking its workers' share.")

    def search_keys(self) -> list[str]:
        """The dotted run-config keys the space sets: a section's variants contribute each key they name."""
        keys: dict[str, None] = {}
        for key, domain in self.space.items():
            for value in domain.probe_values():
                keys.update(dict.fromkeys(flat_overrides({key: value})))
        return list(keys)

    def space_params(self) -> dict[str, str]:
        """The search space as MLflow params of the sweep's parent run: `space.loss.beta` = `{grid: [0.1, 0.3]}`,
        and how it is searched."""
        params = {f"space.{key}": yaml.safe_dump(domain.model_dump(exclude_none=True), default_flow_style=True,
                                                 width=10_000).strip() for key, domain in self.space.items()}
        return params | {"metric": self.metric, "mode": self.mode, "num_samples": str(self.num_samples),
                         "search": self.search.algorithm if self.search else "none",
                         "scheduler": "asha" if self.scheduler else "none"}

    @model_validator(mode="after")
    def _checks(self) -> SweepConfig:
        if self.metric not in METRIC_NAMES:
            tag = " is a run tag (one count per run), not a metric a trial reports" \
                if self.metric.startswith("data/") else " is not a metric a run reports"
            raise ValueError(f"{self.metric!r}{tag}; use one of {ALLOWED_METRICS} (docs/metrics.md)")
        variants = self.space.get(RUN_VARIANTS)
        if variants is not None and (variants.grid is None and variants.choice is None
                                     or not all(isinstance(v, dict) and v for v in variants.probe_values())):
            raise ValueError(f"space.{RUN_VARIANTS} lists variants of the whole run config: a grid or choice of "
                             "non-empty mappings of run-config keys, e.g. {grid: [{loss: {name: sft}}, "
                             "{loss: {name: dpo}, iterate: {rounds: 3}}]}")
        if self.search is not None and any(d.grid is not None for d in self.space.values()):
            raise ValueError("a search algorithm (search:) cannot use grid domains; use choice instead")
        if self.scheduler is not None and self.metric.startswith("eval/"):
            raise ValueError(f"ASHA compares trials at every report, but {self.metric} is only measured at eval "
                             "time; use a training metric (e.g. rewards/margins, delta_chosen/mean, loss)")
        if self.search is not None:
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise ValueError("search.algorithm=optuna needs Optuna: pip install 'mdpo-ray[optuna]'") from None
        return self


def _explain(error: ValidationError, source: str) -> str:
    lines = [f"invalid sweep ({source}):"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<top level>"
        reason = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {reason}")
    return "\n".join(lines)


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[SweepConfig, dict[str, Any]]:
    """(sweep, base run dict). `overrides` (`key=value`) apply to the base run config of every trial."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"sweep file not found: {file}")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file} is not valid YAML: {exc}") from exc
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, str(file))) from None
    base: dict[str, Any] = {}
    if sweep.base is not None:
        base_file = (file.parent / sweep.base).resolve()
        if not base_file.is_file():
            raise ConfigError(f"{file}: base run config not found: {base_file}")
        base = yaml.safe_load(base_file.read_text()) or {}
    base = _merge(base, sweep.run)
    for text in overrides:
        set_dotted(base, *parse_override(text))
    validate_config(base, source=f"{file} (base run)")
    for key, domain in sweep.space.items():
        for value in domain.probe_values():
            trial_config(base, {key: value}, source=f"{file}: space.{key} = {value!r}")
    return sweep, base


def flat_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"loss": {"name": "dpo", "beta": 0.1}, "optim.lr": 1e-4} -> {"loss.name": "dpo", "loss.beta": 0.1, "optim.lr": 1e-4};
    a RUN_VARIANTS variant's keys are the run config's own: {"run": {"loss": {"name": "sft"}}} -> {"loss.name": "sft"}."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if key == RUN_VARIANTS and isinstance(value, dict):
            flat.update(flat_overrides(value))
        elif isinstance(value, dict):
            flat.update(flat_overrides({f"{key}.{sub}": v for sub, v in value.items()}))
        else:
            flat[key] = value
    return flat


def trial_config(base: dict[str, Any], overrides: dict[str, Any], *, source: str = "trial") -> RunConfig:
    """The run config of one trial: the base with dotted overrides (section variants merged), validated."""
    raw = _merge(base, {})
    for key, value in flat_overrides(overrides).items():
        set_dotted(raw, key, value)
    return validate_config(raw, source=source)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = {k: (_merge(v, {}) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
