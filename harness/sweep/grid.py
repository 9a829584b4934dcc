"""A sweep's grid: axes (lists, ranges, log2 ranges, sliding log2 windows) and constraints on grid points.

Axis forms: a list of values; a scalar; `{range: N}` or `{range: [a, b]}`; `{log2: [lo, hi], step: 1,
scale: 1}` = scale * 2^e for e = lo, lo+step, ..., hi; a log2 axis may `slide` with another axis:
`slide: {axis: batch.global_batch_size, ref: 64, rate: 1, min: 0, max: 5}` shifts the exponents by
clamp(rate * log2(B / ref), min, max), so the window follows the linear scaling rule (sec. 3.2) and stops
where it saturates. `constraints: ["schedule.final_lr < optim.effective_lr"]` drops grid points (sec. 7.1).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Optional

from harness.core.errors import ConfigError
from harness.core.keys import get_dotted


@dataclass(frozen=True)
class Slide:
    axis: str
    ref: float
    rate: float = 1.0
    min: float = -math.inf
    max: float = math.inf


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple  # for a sliding axis: the window before the shift
    log2: Optional[tuple] = None  # (exponents, scale) when given as {log2: ...}
    step: float = 1.0
    slide: Optional[Slide] = None

    def values_at(self, point: dict) -> list:
        if self.slide is None:
            return list(self.values)
        other = point[self.slide.axis]
        if not isinstance(other, (int, float)) or other <= 0:
            raise ConfigError(f"grid key {self.key}: slide.axis {self.slide.axis} must be a positive number, got {other!r}")
        shift = min(self.slide.max, max(self.slide.min, self.slide.rate * math.log2(other / self.slide.ref)))
        shift = round(shift / self.step) * self.step  # stay on the grid's lattice
        exponents, scale = self.log2
        return [_pow2(e + shift, scale) for e in exponents]

    def describe(self) -> str:
        if self.log2 is not None:
            exps, scale = self.log2
            text = f"{_fmt_scale(scale)}2^{_fmt_num(exps[0])} .. 2^{_fmt_num(exps[-1])} ({len(exps)} values, log2 step {_fmt_num(self.step)})"
            if self.slide:
                s = self.slide
                text += (f", sliding with {s.axis}: +{_fmt_num(s.rate)} per doubling from {_fmt_num(s.ref)}"
                         f" (shift {_fmt_num(s.min)}..{_fmt_num(s.max)})")
            return text
        vals = list(self.values)
        shown = ", ".join(map(_fmt_value, vals if len(vals) <= 8 else vals[:3] + ["..."] + vals[-2:]))
        return f"{shown} ({len(vals)} value{'s' if len(vals) != 1 else ''})"


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _fmt_scale(scale: float) -> str:
    return "" if scale == 1 else f"{scale:g} x "


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _pow2(e: float, scale: float) -> float:
    e = round(e, 9)
    return scale * 2.0 ** e


AXIS_KEYS = ("values", "range", "log2", "step", "scale", "slide")
# Limits on a grid, checked before anything is expanded: an axis of a million seeds, or a product of axes that
# no allocation could train, is a typo; refusing it at once beats minutes of expansion and a memory blow-up.
# The yaml/ sweeps have at most 15 values per axis and about a thousand points.
MAX_AXIS_VALUES = 10_000
MAX_GRID_POINTS = 50_000


def _check_axis_size(where: str, n: int) -> None:
    if n > MAX_AXIS_VALUES:
        raise ConfigError(f"{where}: {n:,} values, more than the {MAX_AXIS_VALUES:,} an axis may have; "
                          "narrow the axis (a typo in a range or log2 step?)")


def check_grid_size(blocks: list[list["Axis"]]) -> int:
    """The number of grid points (before constraints), or ConfigError above MAX_GRID_POINTS."""
    sizes = [math.prod(len(a.values) for a in axes) for axes in blocks]
    if sum(sizes) > MAX_GRID_POINTS:
        shape = " + ".join(" x ".join(str(len(a.values)) for a in axes) or "1" for axes in blocks)
        raise ConfigError(f"the grid has {sum(sizes):,} points ({shape}), more than the {MAX_GRID_POINTS:,} a sweep "
                          "may have; split it into several specs or narrow its axes")
    return sum(sizes)
SLIDE_KEYS = ("axis", "ref", "rate", "min", "max")


def parse_axis(key: str, spec: Any) -> Axis:
    where = f"grid key {key}"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: an empty list of values; give at least one")
        _check_axis_size(where, len(spec))
        return Axis(key, tuple(spec))
    if not isinstance(spec, dict):
        return Axis(key, (spec,))
    unknown = [k for k in spec if k not in AXIS_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown axis form {unknown[0]!r}; valid: {', '.join(AXIS_KEYS)} "
                          "(e.g. {log2: [-2, 6]}, {range: 15}, [64, 128])")
    forms = [k for k in ("values", "range", "log2") if k in spec]
    if len(forms) != 1:
        raise ConfigError(f"{where}: give exactly one of values, range, log2 (got {', '.join(forms) or 'none'})")
    if "values" in spec:
        if set(spec) - {"values"}:
            raise ConfigError(f"{where}: 'values' takes no other keys")
        return parse_axis(key, list(spec["values"]) if isinstance(spec["values"], list) else [spec["values"]])
    if "range" in spec:
        r = spec["range"]
        if set(spec) - {"range"}:
            raise ConfigError(f"{where}: 'range' takes no other keys")
        if isinstance(r, int) and not isinstance(r, bool) and r > 0:
            _check_axis_size(where, r)
            return Axis(key, tuple(range(r)))
        if isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in r) and r[0] < r[1]:
            _check_axis_size(where, r[1] - r[0])
            return Axis(key, tuple(range(r[0], r[1])))
        raise ConfigError(f"{where}: range must be a positive count N (0..N-1) or [start, stop) integers, got {r!r}")
    lo_hi = spec["log2"]
    if not (isinstance(lo_hi, list) and len(lo_hi) == 2 and all(_is_num(x) for x in lo_hi) and lo_hi[0] <= lo_hi[1]):
        raise ConfigError(f"{where}: log2 must be [lowest, highest] exponents, got {lo_hi!r}")
    step = _number(spec.get("step", 1), f"{where}.step", positive=True)
    scale = _number(spec.get("scale", 1), f"{where}.scale", positive=True)
    n = (lo_hi[1] - lo_hi[0]) / step
    if not math.isfinite(n) or abs(n - round(n)) > 1e-9:
        raise ConfigError(f"{where}: log2 range {lo_hi} is not a whole number of steps of {step}")
    _check_axis_size(where, int(round(n)) + 1)
    exponents = tuple(round(lo_hi[0] + i * step, 9) for i in range(int(round(n)) + 1))
    slide = None
    if "slide" in spec:
        s = spec["slide"]
        if not isinstance(s, dict) or "axis" not in s or "ref" not in s:
            raise ConfigError(f"{where}.slide: give {{axis: KEY, ref: VALUE, rate: 1, min: 0, max: M}}")
        bad = [k for k in s if k not in SLIDE_KEYS]
        if bad:
            raise ConfigError(f"{where}.slide: unknown key {bad[0]!r}; valid: {', '.join(SLIDE_KEYS)}")
        slide = Slide(str(s["axis"]), _number(s["ref"], f"{where}.slide.ref", positive=True),
                      _number(s.get("rate", 1.0), f"{where}.slide.rate"),
                      _number(s.get("min", -math.inf), f"{where}.slide.min"),
                      _number(s.get("max", math.inf), f"{where}.slide.max"))
    return Axis(key, tuple(_pow2(e, scale) for e in exponents), (exponents, scale), step, slide)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number(x: Any, where: str, positive: bool = False) -> float:
    if isinstance(x, str):
        try:
            x = float(x)
        except ValueError:
            pass
    if not _is_num(x) or (positive and x <= 0):
        raise ConfigError(f"{where}: expected a {'positive ' if positive else ''}number, got {x!r}")
    return float(x)


# ---------------------------------------------------------------------------------------------- constraints

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.]*|-?[\d.]+(?:[eE]-?\d+)?)\s*(<=|>=|==|!=|<|>)\s*([A-Za-z_][\w.]*|-?[\d.]+(?:[eE]-?\d+)?)\s*$")


def parse_constraint(text: str):
    m = CONSTRAINT.match(text)
    if not m:
        raise ConfigError(f"spec constraint {text!r}: expected 'KEY OP KEY_OR_NUMBER' with OP one of {' '.join(OPS)}, "
                          "e.g. 'schedule.final_lr < optim.effective_lr'")
    lhs, op, rhs = m.groups()
    return lhs, OPS[op], rhs


def _operand(cfg_dict: dict, token: str) -> Any:
    try:
        return float(token)
    except ValueError:
        return get_dotted(cfg_dict, token, where=f"constraint operand {token}")


def satisfies(cfg_dict: dict, constraints: list) -> bool:
    """A null operand means the constraint does not apply to this run."""
    for lhs, op, rhs in constraints:
        a, b = _operand(cfg_dict, lhs), _operand(cfg_dict, rhs)
        if a is not None and b is not None and not op(a, b):
            return False
    return True
