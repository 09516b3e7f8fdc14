"""Findings: what a check found, in units the reader knows, and how to replay it.

A finding is plain data (JSON-serialisable) with one message modelled on
``torch.testing.assert_close`` and Hypothesis's falsifying examples: what failed, how many
elements, the worst one (got, exact, difference in ulps of the dtype), how badly in multiples of
the allowance (and the allowance in units of ``u·A``), whether a plain same-precision
implementation fails the same way there, which reference decided, and the command that replays it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

CATEGORIES = ("forward", "grad", "overflow", "nan", "underflow", "masked-row", "shape", "dtype", "crash",
              "timeout", "nondeterministic")
NONFINITE = ("overflow", "nan")
_REFERENCES = {"mp": "the mpmath oracle", "naive64": "float64 naive reference, certified: its error is below 1/64 "
               "of the allowance", "naive64*": "float64 naive reference, certified except on rows the contract leaves "
               "unconstrained"}  # a non-finite result where the exact value is finite
_NUMBERS = ("got", "exact", "allowance", "ratio", "ulps", "scale", "u")  # float fields, possibly non-finite


def json_number(x: float | None) -> float | str | None:
    """``x`` for strict JSON: "inf", "-inf" or "nan" where it is not finite (``number_from_json`` reads it back)."""
    return str(x) if x is not None and not math.isfinite(x) else x


def number_from_json(x: float | str | None) -> float | None:
    """What ``json_number`` wrote, as a float again."""
    return float(x) if isinstance(x, str) else x


_WHAT = {"overflow": "±inf where the exact value is finite", "nan": "NaN where the exact value is finite",
         "underflow": "returned as 0 or subnormal beyond the allowance", "masked-row": "break the masked-row policy",
         "nondeterministic": "differ between two runs of the same case"}


@dataclass
class Finding:
    """One defect of one target on one case."""

    category: str
    check: str  # "forward", "grad" or "determinism": the check that found it
    target: str
    dtype: str
    family: str
    mask_kind: str
    describe: str  # the case in one line (Case.describe)
    output: str = "out"  # out, dq, dk, dv, dbias
    count: int = 0  # elements beyond the allowance (or non-finite, ...)
    total: int = 0
    index: tuple[int, ...] | None = None
    got: float | None = None
    exact: float | None = None
    allowance: float | None = None
    ratio: float | None = None  # |got - exact| / allowance
    ulps: float | None = None  # |got - exact| in ulps of the dtype at the exact value (None where exact is 0)
    scale: float | None = None  # A: the absolute-value scale of the worst element
    u: float | None = None  # unit roundoff of the dtype
    plain: str = ""  # how a plain same-precision implementation does at the worst element
    reference: str = ""  # which reference decided the exact values
    detail: str = ""
    case_file: str | None = None
    dims: dict = field(default_factory=dict)
    chunks: tuple[int | None, int | None] = (None, None)

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown finding category {self.category!r}; known: {', '.join(CATEGORIES)}")

    @property
    def key(self) -> tuple[str, str, str]:
        """Findings with the same key are the same bug for merging and reporting: category × dtype × output."""
        return (self.category, self.dtype, self.output)

    def to_json(self) -> dict:
        """Strict JSON: a non-finite number (a target's ``got`` of -inf, say) is written as "inf", "-inf", "nan"."""
        d = asdict(self)
        d["index"] = list(self.index) if self.index is not None else None
        d["chunks"] = list(self.chunks)
        for name in _NUMBERS:
            d[name] = json_number(d[name])
        return d

    @classmethod
    def from_json(cls, d: dict) -> Finding:
        d = dict(d)
        d["index"] = tuple(d["index"]) if d.get("index") is not None else None
        d["chunks"] = tuple(d.get("chunks") or (None, None))
        for name in _NUMBERS:
            if name in d:
                d[name] = number_from_json(d[name])
        return cls(**d)

    def message(self) -> str:
        """The multi-line report a reader of a failed CI log needs."""
        where = f"{self.check} pass" if self.category in ("crash", "timeout") else self.output
        lines = [f"FAIL {self.category} · {self.target} · {self.dtype} · {where}", f"  {self.describe}"]
        if self.got is not None and self.exact is not None and self.index is not None:
            where = f"{self.output}[{','.join(str(i) for i in self.index)}]"
            what = _WHAT.get(self.category, "beyond the allowance")
            delta = f"Δ {self.got - self.exact:+.4g}" if _finite(self.got) and _finite(self.exact) else ""
            if delta and self.ulps is not None:
                delta += f", {self.ulps:.3g} ulp"
            lines.append(f"  {self.count} of {self.total} {self.output} elements {what}; worst {where}: "
                         f"got {self.got:.6g}, exact {self.exact:.6g}" + (f" ({delta})" if delta else ""))
            if self.ratio is not None and self.allowance is not None:
                lines.append(f"  = {self.ratio:.3g} × allowance (allowance {self.allowance:.3g}{self._in_ua()})")
        elif self.count:
            lines.append(f"  {self.count} of {self.total} {self.output} elements")
        if self.plain:
            lines.append(f"  {self.plain}")
        if self.detail:
            lines.append(f"  {self.detail}")
        if self.reference:
            lines.append(f"  exact values: {self.reference} ({_REFERENCES.get(self.reference, '')})")
        if self.case_file:
            lines.append(f"  replay: attnverify repro {self.case_file}")
        return "\n".join(lines)

    def _in_ua(self) -> str:
        if not self.scale or not self.u or not self.allowance:
            return ""
        return f" = {self.allowance / (self.u * self.scale):.3g}·u·A with u = 2^{round(math.log2(self.u))}, " \
               f"A = {self.scale:.3g}"


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
