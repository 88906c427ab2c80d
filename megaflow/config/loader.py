"""YAML loading with `extends:` includes, `model.preset`, dotted command-line overrides and validation.

OmegaConf does the merging and `${...}` interpolation; pydantic (schema.py) does the checking. Every
failure becomes a `ConfigError` whose message is one line naming the file or key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from megaflow.config.schema import StageConfig
from megaflow.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_ROOT = REPO_ROOT / "configs"


class ConfigError(UserError):
    """A user error in a config file or override; the CLI prints it as one line and exits 2."""


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config {'is a directory, not a file' if path.is_dir() else 'file not found'}: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return OmegaConf.create(data)


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    """Load `path`, merging it over the files its `extends:` names (relative to it), depth first."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular extends")
    cfg = _read_yaml(path)
    parents = cfg.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, (list, tuple, ListConfig)) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: extends: expected a file name or a list of them, got {parents!r}")
    base = OmegaConf.create({})
    for parent in parents:
        base = OmegaConf.merge(base, load_yaml_tree(path.parent / parent, (*_seen, path)))
    return OmegaConf.merge(base, cfg)


def resolve_preset(name: str) -> Path:
    """A preset is a name in configs/models (`tiny`) or a path to a YAML file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    preset = CONFIG_ROOT / "models" / f"{name}.yaml"
    if not preset.is_file():
        known = sorted(p.stem for p in (CONFIG_ROOT / "models").glob("*.yaml"))
        raise ConfigError(f"model.preset: unknown preset {name!r} (known: {', '.join(known)})")
    return preset


def _apply_preset(cfg: DictConfig) -> DictConfig:
    preset = OmegaConf.select(cfg, "model.preset")
    if not preset:
        return cfg
    preset_cfg = load_yaml_tree(resolve_preset(str(preset)))
    return OmegaConf.merge(preset_cfg, cfg)


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.steps=50)")
        if not all(part.strip() for part in item.split("=", 1)[0].split(".")):
            raise ConfigError(f"override {item!r}: the key has an empty part (expected dotted names, e.g. train.steps)")
    merged = OmegaConf.create({})
    for item in overrides:  # one at a time, so that an error names its override
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except yaml.YAMLError as e:  # OmegaConf reads each value as YAML: `data.train=[{path: x`
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e})"
                              .splitlines()[0]) from None
        except (OmegaConfBaseException, ValueError) as e:
            raise ConfigError(f"override {item!r}: {getattr(e, 'msg', None) or e}".splitlines()[0]) from None
    return merged


def format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown config key"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error" and not loc:
        return msg
    given = first.get("input")
    got = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
    return f"{loc}: {msg}{got}" if loc else msg


def validate(raw: dict[str, Any], schema: type[BaseModel] = StageConfig) -> Any:
    """`raw` as a `schema` (a training stage's StageConfig unless told); a ConfigError naming the key."""
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(
    path: str | Path | None, overrides: list[str] = (), defaults: dict[str, Any] | None = None,
    schema: type[BaseModel] = StageConfig,
) -> Any:
    """Load a stage config: defaults < extends chain < file < preset fill-in < overrides, then validate
    as `schema` (StageConfig, or another stage's such as CurateStageConfig)."""
    cfg = OmegaConf.create(defaults or {})
    if path is not None:
        cfg = OmegaConf.merge(cfg, load_yaml_tree(path))
    cfg = OmegaConf.merge(cfg, _parse_overrides(list(overrides)))
    cfg = _apply_preset(cfg)
    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config interpolation: {str(e).splitlines()[0]}") from None
    return validate(raw, schema)


def dump_config(cfg: StageConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
