"""Loading a run config: YAML and `--set key=value` overrides into one validated RunConfig, relative paths made
absolute, errors explained by key (ConfigError); the storage check before Ray starts; YAML and flat params out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mdpo_ray import storage
from mdpo_ray.config.run import RunConfig

# Where Ray unpacks a job's --working-dir (ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME, under the session dir).
RAY_RUNTIME_RESOURCES = "runtime_resources"


class ConfigError(ValueError):
    """A config the user must fix; the message names the key and the fix."""


def _absolute(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Resolve relative local paths against `base` so that every Ray worker reads the same files."""
    out = dict(raw)
    output_dir = out.get("output_dir", "mdpo_runs")
    if isinstance(output_dir, os.PathLike):
        output_dir = out["output_dir"] = os.fspath(output_dir)
    if isinstance(output_dir, str) and not storage.looks_like_uri(output_dir):  # a URI is checked by the schema
        out["output_dir"] = str((base / os.path.expanduser(output_dir)).resolve())
    for section, keys in (("data", ("train", "eval", "generation_eval")), ("model", ("name_or_path", "tokenizer", "reference"))):
        sub = out.get(section)
        if not isinstance(sub, dict):
            continue  # not a mapping: the schema reports it
        sub = dict(sub)
        for key in keys:
            value = sub.get(key)
            if isinstance(value, str) and not value.startswith("builtin:"):
                candidate = base / os.path.expanduser(value)
                if candidate.exists():  # otherwise a hub name: leave it
                    sub[key] = str(candidate.resolve())
        out[section] = sub
    model = out.get("model")
    if isinstance(model, dict) and isinstance(model.get("chat_template"), str):
        out["model"] = model | {"chat_template": _chat_template_source(model["chat_template"], base)}
    builtin = out.get("builtin") or {}
    if isinstance(builtin, dict):
        builtin = dict(builtin)
        builtin["cache_dir"] = str(Path(os.path.expanduser(builtin.get("cache_dir", "~/.cache/mdpo-ray"))).resolve())
        out["builtin"] = builtin
    return out


def is_jinja(text: str) -> bool:
    """model.chat_template: the template itself (Jinja markup) rather than the path of a file holding one."""
    return "{{" in text or "{%" in text


def _chat_template_source(value: str, base: Path) -> str:
    """The template text as given, or its file's absolute path (read by every worker); a ConfigError if it is
    neither, so a typo fails here rather than on each worker."""
    if is_jinja(value):
        return value
    path = base / os.path.expanduser(value)
    try:
        found = path.is_file()
    except (OSError, ValueError):  # e.g. a name too long for the file system: not a path
        found = False
    if not found:
        raise ConfigError(
            f"model.chat_template: {value!r} is neither a Jinja template (it has no {{{{ or {{%) nor a file "
            f"(looked for {path.resolve()}); give the template text or the path of a file holding it")
    return str(path.resolve())


def check_storage_outlives_job(cfg: RunConfig) -> None:
    """A ConfigError if checkpoints, the export or the MLflow store would be written inside Ray's copy of a
    job's --working-dir (a relative output_dir under `ray job submit`): Ray deletes that copy with its
    cache, and a re-submitted job gets a new one, so nothing would be found again to resume or compare.
    Refused rather than moved somewhere: only the user knows which storage every node reaches.
    An object-store output_dir is written to once (and the object deleted): a missing bucket, refused
    credentials or an endpoint that does not answer are said now, before Ray starts."""
    if storage.is_remote(cfg.output_dir):
        try:
            storage.probe_writable(cfg.output_dir)
        except OSError as error:
            raise ConfigError(
                f"output_dir ({cfg.output_dir}) cannot be written to: {error}. Check that the bucket exists and that "
                "this machine's AWS credentials may write there (an instance profile, or AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY; AWS_ENDPOINT_URL for an S3-compatible store). Nothing has started") from None
    inside = [f"output_dir ({cfg.output_dir})"] if RAY_RUNTIME_RESOURCES in Path(cfg.output_dir).parts else []
    store = _local_store(cfg.mlflow_uri)
    if store is not None and RAY_RUNTIME_RESOURCES in (Path.cwd() / store).parts:
        default = " (the default store, in output_dir)" if cfg.tracking.mlflow_uri is None else ""
        inside.append(f"tracking.mlflow_uri ({cfg.mlflow_uri}{default})")
    if inside:
        raise ConfigError(
            f"{' and '.join(inside)} would be inside Ray's copy of this job's working directory "
            f"({RAY_RUNTIME_RESOURCES}/...), which Ray deletes; a re-submitted job would not find the checkpoints, "
            "the export or the runs. Nothing has started. Set output_dir to an absolute path every node can reach "
            "(--set output_dir=/mnt/shared/mdpo_runs) or to object storage (--set output_dir=s3://bucket/prefix), "
            "and tracking.mlflow_uri to an MLflow server "
            "(--set tracking.mlflow_uri=http://<head>:5000)")


def _local_store(uri: str) -> str | None:
    """The path of a local MLflow store (sqlite:///<path>, file:<path>, a bare path; relative to the process
    cwd), None for a server."""
    if uri.startswith("sqlite:///"):
        return uri.removeprefix("sqlite:///")
    if uri.startswith("file:"):
        return uri.removeprefix("file://").removeprefix("file:")
    return None if "://" in uri or uri.split(":")[0] in ("databricks", "databricks-uc", "uc") else uri


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: `{part}` is a value, not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`loss.beta=0.3` -> ("loss.beta", 0.3); the value is read as YAML so numbers and lists work."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set loss.beta=0.3")
    return key.strip(), yaml.safe_load(value)


def _explain(error: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<top level>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; check the spelling against docs/configuration.md")
        elif item["loc"]:
            lines.append(f"  {key}: {item['msg'].removeprefix('Value error, ')} (got {item.get('input')!r})")
        else:  # a cross-field check: its message names the keys and the fix
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Read YAML (or the defaults), apply `key=value` overrides, validate once; raise ConfigError."""
    raw: dict[str, Any] = {}
    source = "defaults"
    base = Path.cwd()
    if path is not None:
        file = Path(path)
        source = str(file)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}")
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections (model:, data:, loss:, ...)")
        raw = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
        source += f" + --set {text}"
    return validate_config(raw, source=source, base=base)


def validate_config(raw: dict[str, Any], *, source: str = "config", base: Path | None = None) -> RunConfig:
    try:
        return RunConfig.model_validate(_absolute(raw, base or Path.cwd()))
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: RunConfig) -> dict[str, str]:
    """Dotted keys -> values, for MLflow params."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = str(node)

    walk("", cfg.model_dump(mode="json"))
    return flat
