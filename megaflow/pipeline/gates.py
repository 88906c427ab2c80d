"""Gates: conditions on a stage's metrics that must hold for the pipeline to go on.

    gate: ["exact_match >= 0.3", "valid_ppl < 0.5 * unigram_ppl", "models.dpo.win_rate_vs_sft > 0.5"]

Each side is a number, a metric of the stage's result (eval.json, nested keys joined by dots; a
`STAGE.` prefix naming the stage itself may be written), or a number times a metric.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from megaflow.errors import UserError

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne}
_SIDE = re.compile(r"^\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<times>\*)?\s*)?(?P<name>[A-Za-z_][\w./-]*)?\s*$")
_OP = re.compile(r"(>=|<=|==|!=|>|<)")


@dataclass(frozen=True)
class Side:
    factor: float
    metric: str | None

    def value(self, metrics: dict[str, float], stage: str) -> float:
        if self.metric is None:
            return self.factor
        name = self.metric.removeprefix(stage + ".")
        if name not in metrics:
            raise KeyError(name)
        return self.factor * float(metrics[name])


@dataclass(frozen=True)
class Gate:
    text: str
    left: Side
    op: str
    right: Side

    def check(self, metrics: dict[str, float], stage: str) -> tuple[bool, str]:
        """(passed, what was compared); a metric the stage did not report fails with that said."""
        try:
            a, b = self.left.value(metrics, stage), self.right.value(metrics, stage)
        except KeyError as e:
            known = ", ".join(sorted(metrics)) or "none"
            return False, f"{self.text}: the stage reported no metric {e.args[0]!r} (it reported: {known})"
        return OPS[self.op](a, b), f"{self.text} ({a:.4g} {self.op} {b:.4g})"


def _side(text: str, where: str, gate: str) -> Side:
    m = _SIDE.match(text)
    if not m or not (m["num"] or m["name"]) or (m["num"] and m["name"] and not m["times"]):
        raise UserError(f"{where}: cannot read {gate!r}: expected METRIC OP NUMBER, e.g. 'valid_accuracy >= 0.7'")
    return Side(float(m["num"]) if m["num"] else 1.0, m["name"])


def parse_gate(text, where: str) -> Gate:
    if not isinstance(text, str):
        raise UserError(f"{where}: expected a condition such as 'valid_accuracy >= 0.7', got {text!r}")
    parts = _OP.split(text)
    if len(parts) != 3:
        raise UserError(f"{where}: cannot read {text!r}: expected one comparison (>=, <=, >, <, ==, !=)")
    left, op, right = parts
    return Gate(text.strip(), _side(left, where, text), op, _side(right, where, text))


def flat_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a stage's result, nested keys joined by dots (bools and lists left out)."""
    out = {}
    for k, v in result.items():
        if isinstance(v, dict) and k not in ("data", "samples"):
            out |= flat_metrics(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out
