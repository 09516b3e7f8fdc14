"""Reading memory measurements: exponents in L, dense / chunked ratios, and how chunk sizes enter.

``fit_exponent`` is the least-squares slope of log(bytes) against log(L); ``ratios`` compares a dense
reference with a chunked target at the paper's L = 16384 (Rabe & Staats report 59x forward and 32x
forward + backward there); ``chunk_model`` fits ``bytes = A + B * key_chunk + C * ceil(L / key_chunk)``
over a key-chunk sweep, the model behind the seed question (why the query chunk is not in O(sqrt n)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from verify.memory.measure import PASSES, Row

PAPER_LENGTH = 16384
PAPER_RATIO = {"forward": 59.0, "fwd+bwd": 32.0}  # Rabe & Staats: memory overhead reduced 59x / 32x at n = 16384


def fit_exponent(lengths: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) against log(length); None with fewer than two positive points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(lengths, values, strict=True) if y is not None and y > 0]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def exponents(rows: Sequence[Row]) -> list[dict]:
    """The fitted exponent in L of each measure, per (target, pass, policy)."""
    out = []
    for key in dict.fromkeys((r.target, r.pass_, r.policy) for r in rows):
        group = sorted((r for r in rows if (r.target, r.pass_, r.policy) == key), key=lambda r: r.length)
        for measure_name in ("temp", "beyond"):
            values = [getattr(r, measure_name) for r in group]
            if all(v is None for v in values):
                continue
            out.append({"target": key[0], "pass": key[1], "policy": key[2], "measure": measure_name,
                        "exponent": fit_exponent([r.length for r in group], values),
                        "lengths": [r.length for r in group]})
    return out


def ratios(dense: Sequence[Row], chunked: Sequence[Row]) -> list[dict]:
    """dense / chunked bytes per pass, policy and measure, at the paper's L = 16384 if both have it, else the
    largest length both have."""
    out = []
    for pass_ in PASSES:
        ref = {r.length: r for r in dense if r.pass_ == pass_}
        for policy in dict.fromkeys(r.policy for r in chunked if r.pass_ == pass_):
            mine = {r.length: r for r in chunked if r.pass_ == pass_ and r.policy == policy}
            common = sorted(set(ref) & set(mine))
            if not common:
                continue
            n = PAPER_LENGTH if PAPER_LENGTH in common else common[-1]
            for measure_name in ("temp", "beyond"):
                a, b = getattr(ref[n], measure_name), getattr(mine[n], measure_name)
                if a is not None and b:
                    out.append({"pass": pass_, "policy": policy, "length": n, "measure": measure_name,
                                "dense": a, "chunked": b, "ratio": a / b, "paper_ratio": PAPER_RATIO[pass_],
                                "paper_length": PAPER_LENGTH})
    return out


def measure_of(rows: Sequence[Row]) -> str:
    """``beyond`` where every row has it, else ``temp``."""
    return "beyond" if rows and all(r.beyond is not None for r in rows) else "temp"


def chunk_model(rows: Sequence[Row]) -> dict | None:
    """Least squares ``bytes = A + B * key_chunk + C * ceil(L / key_chunk)`` over rows at one query chunk and L.

    A: what does not depend on the key chunk; B: bytes per key of a key chunk (the logits blocks);
    C: bytes per key chunk (summaries or carries kept for every key chunk); each also per query row.
    Fitted to ``beyond`` where every row has it, else to ``temp``.
    """
    if len(rows) < 4:
        return None
    measure_name = measure_of(rows)
    kc = np.array([r.key_chunk for r in rows], float)
    nk = np.array([math.ceil(r.length / r.key_chunk) for r in rows], float)
    design = np.stack([np.ones_like(kc), kc, nk], axis=1)
    values = np.array([getattr(r, measure_name) for r in rows], float)
    (a, b, c), *_ = np.linalg.lstsq(design, values, rcond=None)
    cq = rows[0].query_chunk
    return {"measure": measure_name, "query_chunk": cq, "length": rows[0].length, "A": a, "B": b, "C": c,
            "A_per_row": a / cq, "B_per_row": b / cq, "C_per_row": c / cq}


def sweeps(sweep: Sequence[Row], pass_: str) -> tuple[list[Row], list[Row]]:
    """(query-chunk sweep, key-chunk sweep) rows of one pass, each sorted by the chunk it varies."""
    qs = sorted((r for r in sweep if r.pass_ == pass_ and r.policy.startswith("q-sweep")), key=lambda r: r.query_chunk)
    ks = sorted((r for r in sweep if r.pass_ == pass_ and r.policy.startswith("k-sweep")), key=lambda r: r.key_chunk)
    return qs, ks
