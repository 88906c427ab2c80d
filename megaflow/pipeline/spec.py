"""A pipeline file: stages with their configs, wired by references, read and checked before anything runs.

    run: {name: tiny, dir: runs/tiny}          # every stage writes run.dir/STAGE; run.wandb: {project: p}
                                               # logs every stage to W&B, grouped by run.name
    report: {price_per_hour: 2.0}              # optional: the report's cost column (per device-hour)
    stages:
      pretrain:
        config: ../stages/pretrain-tiny.yaml   # a stage file (relative to this file); the keys below win
        data: {train: [{path: ${stages.preprocess.output}}]}
        nproc_per_node: 1                      # this stage's processes (its own parallel layout)
        gate: ["valid_ppl < 0.5 * unigram_ppl"]
        after: [tokenizer]                     # order without a reference (references order by themselves)

A stage's key is its name in the registry (megaflow.algorithms.registry). `${stages.NAME.output}` is the
artifact stage NAME makes (a final checkpoint, a tokenizer, an indexed prefix); it also makes NAME a
dependency. Overrides address a stage: `sft.train.steps=50`, or the pipeline: `run.dir=runs/x`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from megaflow.algorithms import registry
from megaflow.algorithms.base import Stage, missing_inputs
from megaflow.config import loader
from megaflow.config.schema import RunConfig
from megaflow.errors import UserError
from megaflow.pipeline.gates import Gate, parse_gate

PIPELINE_KEYS = ("config", "gate", "nproc_per_node", "after")
REFERENCE = re.compile(r"\$\{stages\.([^.}]+)\.output\}")


@dataclass
class PlannedStage:
    name: str
    stage: Stage
    cfg: BaseModel  # validated through the stage's schema, references resolved
    deps: list[str]
    gates: list[Gate]
    nproc: int = 1
    references: dict[str, str] = field(default_factory=dict)  # input path -> the stage that makes it
    raw: dict = field(default_factory=dict)  # the config as composed (unset keys unset): what the stage reads


@dataclass
class Pipeline:
    path: Path
    run: RunConfig
    stages: dict[str, PlannedStage]  # in the order they run
    price_per_hour: float | None = None
    missing: list[str] = field(default_factory=list)  # inputs not there (listed by --dry-run; a run refuses them)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)

    def descendants(self, name: str) -> set[str]:
        out, frontier = set(), {name}
        while frontier:
            frontier = {s for s, p in self.stages.items() if set(p.deps) & frontier} - out
            out |= frontier
        return out


def is_pipeline_file(path: str | Path) -> bool:
    """A YAML file with a top-level `stages:` mapping (a stage config has none)."""
    try:
        tree = loader.load_yaml_tree(path)
    except (UserError, OSError):
        return False
    return OmegaConf.is_dict(tree.get("stages"))


def _fail(where: str, message: str) -> UserError:
    return UserError(f"{where}: {message}")


def _split_overrides(overrides: list[str], stage_names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    top, per_stage = [], {n: [] for n in stage_names}
    for item in overrides:
        key = item.split("=", 1)[0]
        head, _, rest = key.partition(".")
        if "=" not in item or not rest:
            raise UserError(f"override {item!r}: expected STAGE.key=value (e.g. sft.train.steps=50) or run.KEY=value")
        if head in ("run", "report"):
            top.append(item)
        elif head in per_stage:
            per_stage[head].append(item.split(".", 1)[1])
        else:
            raise UserError(f"override {item!r}: {head!r} is not a stage of this pipeline "
                            f"(stages: {', '.join(stage_names)}) nor run/report")
    return top, per_stage


def _substitute(node: Any, outputs: dict[str, str], where: str, found: dict[str, str]) -> Any:
    """Replace `${stages.NAME.output}` in every string of `node`; record which stage each names."""
    if isinstance(node, dict):
        return {k: _substitute(v, outputs, f"{where}.{k}", found) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, outputs, f"{where}[{i}]", found) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def replace(m: re.Match) -> str:
        if m.group(1) not in outputs:
            raise _fail(where, f"{m.group(0)} names no stage of this pipeline (stages: {', '.join(outputs)})")
        found[outputs[m.group(1)]] = m.group(1)
        return outputs[m.group(1)]
    return REFERENCE.sub(replace, node)


def _order(deps: dict[str, list[str]]) -> list[str]:
    """Stages in dependency order, file order among equals; a cycle is an error naming it."""
    done, order = set(), []
    pending = list(deps)
    while pending:
        ready = [n for n in pending if set(deps[n]) <= done]
        if not ready:
            cycle, n = [], pending[0]
            while n not in cycle:
                cycle.append(n)
                n = next(d for d in deps[n] if d not in done)
            raise UserError(f"stages: a cycle of references: {' -> '.join(cycle[cycle.index(n):] + [n])}")
        order.append(ready[0])
        done.add(ready[0])
        pending.remove(ready[0])
    return order


def _validate(stage: Stage, raw: dict, name: str) -> BaseModel:
    try:
        if stage.schema is loader.StageConfig:
            return loader.validate(raw)
        return stage.schema.model_validate(raw)
    except loader.ConfigError as e:
        raise _fail(f"stages.{name}", str(e)) from None
    except ValidationError as e:
        raise _fail(f"stages.{name}", loader.format_validation_error(e)) from None


def _model_from_init(cfg, name: str, found: dict[str, str], planned: dict[str, PlannedStage],
                     missing_ok: bool) -> None:
    """A stage without a model section trains its init_from's model: the upstream stage's, or the one on
    disk. Assigning it checks the rules that need the model (tp divides the heads, the sequence fits)
    now, not when the stage starts; the stage's own process reads it from the checkpoint again."""
    from megaflow.training import init_from

    upstream = found.get(cfg.init_from)
    if upstream is not None:
        model = planned[upstream].cfg.model if upstream in registry.TRAINING else None
        if model is None or planned[upstream].cfg.model_from_init:
            return
    elif missing_ok and not Path(cfg.init_from.removeprefix(init_from.HF_PREFIX)).exists():
        return
    else:
        try:
            model = init_from.model_of(cfg.init_from)
        except UserError as e:
            raise _fail(f"stages.{name}", str(e)) from None
        if model is None:
            return
    try:
        cfg.model = model.model_copy()
    except ValidationError as e:
        raise _fail(f"stages.{name}", f"the model of init_from {cfg.init_from}: "
                                      f"{loader.format_validation_error(e)}") from None


def load_pipeline(path: str | Path, overrides: list[str] = (), nproc_per_node: int = 1,
                  missing_ok: bool = False) -> Pipeline:
    """Read, resolve and check a pipeline file; every error is one line naming the stage and key. With
    `missing_ok` (--dry-run) inputs that are not there are listed in `Pipeline.missing` instead."""
    path = Path(path)
    tree = loader.load_yaml_tree(path)
    raw = OmegaConf.to_container(tree, resolve=False)
    unknown = set(raw) - {"run", "stages", "report"}
    if unknown:
        raise UserError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))} (expected run, stages, report)")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise UserError(f"{path}: stages: expected a mapping of stage names to their configs")
    for name, body in stages_raw.items():
        if name not in registry.STAGES:
            raise _fail(f"stages.{name}", f"unknown stage (known: {', '.join(registry.names())})")
        if body is not None and not isinstance(body, dict):
            raise _fail(f"stages.{name}", "expected a mapping (the stage's config)")
    top, per_stage = _split_overrides(list(overrides), list(stages_raw))
    head = OmegaConf.merge(OmegaConf.create({k: raw.get(k) or {} for k in ("run", "report")}),
                           loader._parse_overrides(top))
    try:
        run = RunConfig.model_validate(OmegaConf.to_container(head.run, resolve=True))
    except ValidationError as e:
        raise UserError(f"{path}: run.{loader.format_validation_error(e)}") from None
    report = OmegaConf.to_container(head.report, resolve=True)
    if set(report) - {"price_per_hour"}:
        raise UserError(f"{path}: report: unknown key(s) {', '.join(sorted(set(report) - {'price_per_hour'}))}")

    run_dir = Path(run.dir)
    where_run = SimpleNamespace(run=SimpleNamespace(dir=str(run_dir)))
    outputs = {name: str(registry.get(name).output(where_run)) for name in stages_raw}
    composed, deps, extras = {}, {}, {}
    for name, body in stages_raw.items():
        try:  # the stage's overrides first: they may set pipeline keys too (sft.gate=[...])
            body = OmegaConf.merge(OmegaConf.create(body or {}), loader._parse_overrides(per_stage[name]))
        except loader.ConfigError as e:
            raise _fail(f"stages.{name}", str(e)) from None
        except (OmegaConfBaseException, ValueError) as e:
            raise _fail(f"stages.{name}", str(e).splitlines()[0]) from None
        body = OmegaConf.to_container(body, resolve=False)
        extras[name] = {k: body.pop(k) for k in PIPELINE_KEYS if k in body}
        cfg = OmegaConf.create({})
        if "config" in extras[name]:
            cfg = loader.load_yaml_tree(path.parent / str(extras[name]["config"]))
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(body))
            cfg = loader._apply_preset(cfg)
            shared = {"dir": str(run_dir), "name": run.name}
            if run.wandb is not None and "wandb" not in (cfg.get("run") or {}):  # every stage logs to the group
                shared["wandb"] = run.wandb.model_dump(mode="json")
            cfg.run = OmegaConf.merge(cfg.get("run") or {}, shared)
            cfg.stage = name
            resolved = OmegaConf.to_container(cfg, resolve=False)
        except (OmegaConfBaseException, ValueError) as e:
            raise _fail(f"stages.{name}", str(e).splitlines()[0]) from None
        except loader.ConfigError as e:
            raise _fail(f"stages.{name}", str(e)) from None
        found: dict[str, str] = {}
        resolved = _substitute(resolved, outputs, f"stages.{name}", found)
        try:
            resolved = OmegaConf.to_container(OmegaConf.create(resolved), resolve=True)
        except OmegaConfBaseException as e:
            raise _fail(f"stages.{name}", f"config interpolation: {str(e).splitlines()[0]}") from None
        after = extras[name].get("after", [])
        after = [after] if isinstance(after, str) else after
        for a in after:
            if a not in stages_raw:
                raise _fail(f"stages.{name}.after", f"{a!r} is not a stage of this pipeline")
        deps[name] = sorted(set(found.values()) | set(after), key=list(stages_raw).index)
        composed[name] = (resolved, found)

    planned = {}
    for name in _order(deps):
        stage = registry.get(name)
        resolved, found = composed[name]
        cfg = _validate(stage, resolved, name)
        if name in registry.TRAINING and cfg.model_from_init:
            _model_from_init(cfg, name, found, planned, missing_ok)
        nproc = extras[name].get("nproc_per_node", nproc_per_node if name in registry.TRAINING else 1)
        if not isinstance(nproc, int) or nproc < 1:
            raise _fail(f"stages.{name}.nproc_per_node", f"expected a positive integer, got {nproc!r}")
        if nproc > 1 and name not in registry.TRAINING:
            raise _fail(f"stages.{name}.nproc_per_node", "only training stages run on several processes")
        gates = extras[name].get("gate", [])
        gates = [gates] if isinstance(gates, str) else gates
        if not isinstance(gates, list):
            raise _fail(f"stages.{name}.gate", "expected a list of conditions such as 'valid_accuracy >= 0.7'")
        planned[name] = PlannedStage(name, stage, cfg, deps[name], [parse_gate(g, f"stages.{name}.gate") for g in gates],
                                     nproc, found, resolved)
    pipeline = Pipeline(path, run, planned, report.get("price_per_hour"))
    check(pipeline, missing_ok)
    return pipeline


def check(pipeline: Pipeline, missing_ok: bool = False) -> None:
    """Each stage's own rules and inputs, except what an upstream stage will make. A missing input is an
    error, or with `missing_ok` a line of `pipeline.missing`."""
    for name, p in pipeline.stages.items():
        pending = frozenset(p.references)
        try:
            p.stage.check(p.cfg)
            missing = missing_inputs(p.stage, p.cfg, pending)
            if name in registry.TRAINING:
                if p.nproc > 1:
                    p.cfg.check_layout(p.nproc)
                absent = {path for _, path in missing} if missing_ok else set()
                if p.cfg.init_from and p.cfg.init_from not in pending | absent:
                    p.stage.check_init(p.cfg)
            if missing and not missing_ok:
                key, path = missing[0]
                raise UserError(f"{key}: file not found: {path}")
            pipeline.missing += [f"stages.{name}.{key}: {path}" for key, path in missing]
        except UserError as e:
            raise _fail(f"stages.{name}", str(e)) from None
        except ValueError as e:
            raise _fail(f"stages.{name}", f"nproc_per_node {p.nproc}: {e}") from None
