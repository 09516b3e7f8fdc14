"""The baseline gate: which cells got worse than a committed report.

A cell present in both reports (matched by its key, not the target name) regresses when, for some
output, ``max(new, FLOOR) > F · max(old, FLOOR)`` on ``max_norm`` with ``FLOOR = 0.5`` (u·A units:
half an ulp's worth, so 0 -> rounding noise is no regression), when it has more non-finite
results, when it passed its allowance before and fails it now, or when it has more target errors
than the baseline. Cells missing from either side are counted, not gated.
"""

from __future__ import annotations

from verify.accuracy.plan import CELL_AXES, SCHEMA_VERSION, cell_key, softcap_label, window_label

FLOOR = 0.5
DEFAULT_MAX_REGRESSION = 2.0


def gate(report: dict, baseline: dict, max_regression: float = DEFAULT_MAX_REGRESSION) -> dict:
    """Cells whose error grew more than ``max_regression`` times against ``baseline`` (see the module doc)."""
    if baseline.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"baseline has schema version {baseline.get('schema_version')!r}, this attnverify writes "
                         f"{SCHEMA_VERSION}: their cells cannot be compared; regenerate the baseline on main")
    old = {cell_key(c): c for c in baseline["cells"]}
    new = {cell_key(c): c for c in report["cells"]}
    regressions = []
    for key, cell in new.items():
        if key not in old:
            continue
        base = old[key]
        row = dict(zip(CELL_AXES, key, strict=True))
        if cell["errors"] > base["errors"]:
            regressions.append({**row, "output": "-", "what": "errors", "old": base["errors"],
                                "new": cell["errors"], "factor": None})
        for name, figs in cell["outputs"].items():
            was = base["outputs"].get(name)
            if was is None:
                continue
            if figs["nonfinite"] > was["nonfinite"]:
                regressions.append({**row, "output": name, "what": "nonfinite", "old": was["nonfinite"],
                                    "new": figs["nonfinite"], "factor": None})
            if was["pass"] and not figs["pass"]:
                regressions.append({**row, "output": name, "what": "allowance", "old": was["max_allow"],
                                    "new": figs["max_allow"], "factor": None})
            if figs["max_norm"] is None or was["max_norm"] is None:
                continue
            factor = max(figs["max_norm"], FLOOR) / max(was["max_norm"], FLOOR)
            if factor > max_regression:
                regressions.append({**row, "output": name, "what": "max_norm", "old": was["max_norm"],
                                    "new": figs["max_norm"], "factor": factor})
    both = new.keys() & old.keys()
    return {"max_regression": max_regression, "floor": FLOOR, "compared": len(both),
            "only_new": len(new.keys() - old.keys()), "only_baseline": len(old.keys() - new.keys()),
            "errors_in_both": sum(1 for k in both if new[k]["errors"] and old[k]["errors"]),
            "regressions": regressions}


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def chunk_label(c: int | None) -> str:
    return "own" if c is None else str(c)


def verdict(result: dict) -> str:
    """One line: pass or FAIL, and what was compared."""
    head = f"FAIL: {len(result['regressions'])} regression(s)" if result["regressions"] else "pass"
    extra = f"; {result['errors_in_both']} cell(s) have target errors in both" if result["errors_in_both"] else ""
    return (f"{head} against the baseline (max regression {result['max_regression']}×, floor {result['floor']} u·A; "
            f"{result['compared']} cells compared, {result['only_new']} new, {result['only_baseline']} only in the "
            f"baseline{extra})")


def regression_lines(result: dict) -> list[str]:
    """One line per regressed cell, for the terminal and report.md."""
    lines = []
    for r in result["regressions"]:
        where = (f"{r['dtype']} q={chunk_label(r['query_chunk'])} k={chunk_label(r['key_chunk'])} L={r['length']} "
                 f"{r['family']} mask={r['mask']}"
                 + (f" softcap={softcap_label(r['softcap'])}" if r["softcap"] is not None else "")
                 + (f" window={window_label(r['window'])}" if r["window"] is not None else "") + f" {r['output']}")
        if r["what"] == "max_norm":
            lines.append(f"{where}: max error {fmt(r['old'])} -> {fmt(r['new'])} u·A ({r['factor']:.3g}x)")
        elif r["what"] == "allowance":
            lines.append(f"{where}: passed its allowance before ({fmt(r['old'])}), fails now ({fmt(r['new'])})")
        else:
            lines.append(f"{where}: {r['what']} {r['old']} -> {r['new']}")
    return lines
