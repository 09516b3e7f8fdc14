"""Findings: what a check found, in units the reader knows, and how to replay it.

A finding is plain data (JSON-serialisable) with one message modelled on
``torch.testing.assert_close`` and Hypothesis's falsifying examples: what failed, how many
elements, the worst one (got, exact, difference), how badly in multiples of the allowance and in
ulps of the dtype, and the command that replays it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

CATEGORIES = ("forward", "grad", "overflow", "underflow", "masked-row", "shape", "dtype", "crash", "timeout")


@dataclass
class Finding:
    """One defect of one target on one case."""

    category: str
    check: str  # "forward" or "grad": the pass that found it
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
    ulps: float | None = None  # |got - exact| in ulps of the dtype at the exact value
    detail: str = ""
    case_file: str | None = None
    dims: dict = field(default_factory=dict)
    chunks: tuple[int | None, int | None] = (None, None)

    @property
    def key(self) -> tuple[str, str]:
        """Findings with the same key are the same bug for reporting: category × dtype."""
        return (self.category, self.dtype)

    def to_json(self) -> dict:
        d = asdict(self)
        d["index"] = list(self.index) if self.index is not None else None
        d["chunks"] = list(self.chunks)
        return d

    def message(self) -> str:
        """The multi-line report a reader of a failed CI log needs."""
        head = f"FAIL {self.category} · {self.target} · {self.dtype} · family={self.family} · mask={self.mask_kind}"
        lines = [head, f"  {self.describe}"]
        if self.got is not None and self.exact is not None and self.index is not None:
            where = f"{self.output}[{','.join(str(i) for i in self.index)}]"
            delta = self.got - self.exact if _finite(self.got) and _finite(self.exact) else float("nan")
            what = "non-finite where the exact value is finite" if self.category == "overflow" else "beyond allowance"
            lines.append(
                f"  {self.count} of {self.total} {self.output} elements {what}; worst {where}: "
                f"got {self.got:.6g}, exact {self.exact:.6g} (Δ {delta:+.4g})"
            )
            if self.ratio is not None and self.allowance is not None:
                ulps = f", {self.ulps:.3g} ulp" if self.ulps is not None else ""
                lines.append(f"  = {self.ratio:.3g} × allowance (allowance {self.allowance:.3g}{ulps})")
        elif self.count:
            lines.append(f"  {self.count} of {self.total} {self.output} elements")
        if self.detail:
            lines.append(f"  {self.detail}")
        if self.case_file:
            lines.append(f"  replay: attnverify repro {self.case_file}")
        return "\n".join(lines)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
