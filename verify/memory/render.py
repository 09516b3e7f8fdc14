"""memory.json, memory.md and memory.png of a memory run, and its short terminal summary."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from verify.memory.analysis import chunk_model, exponents, fit_exponent, measure_of, sweeps
from verify.memory.measure import PASSES, Row

SCHEMA_VERSION = 1


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.3f}"


def _length_table(rows: Sequence[Row], pass_: str, measure_name: str) -> list[str]:
    sel = [r for r in rows if r.pass_ == pass_ and getattr(r, measure_name) is not None]
    if not sel:
        return []
    lengths = sorted({r.length for r in sel})
    lines = [f"| target | policy (q x k) | {' | '.join(str(n) for n in lengths)} | exponent |",
             "| --- | --- |" + " ---: |" * (len(lengths) + 1)]
    for key in dict.fromkeys((r.target, r.policy) for r in sel):
        group = {r.length: r for r in sel if (r.target, r.policy) == key}
        exp = fit_exponent(sorted(group), [getattr(group[n], measure_name) for n in sorted(group)])
        cells = [_mib(getattr(group[n], measure_name)) if n in group else "" for n in lengths]
        lines.append(f"| {key[0]} | {key[1]} | {' | '.join(cells)} | {'—' if exp is None else f'{exp:.2f}'} |")
    return lines


def _sweep_table(rows: Sequence[Row], vary: str) -> list[str]:
    if not rows:
        return []
    has_beyond = any(r.beyond is not None for r in rows)
    head = "| query chunk | key chunk | temp MiB |" + (" beyond MiB |" if has_beyond else "") + " temp / first |"
    lines = [head, "| ---: | ---: | ---: |" + (" ---: |" if has_beyond else "") + " ---: |"]
    for r in rows:
        extra = f" {_mib(r.beyond)} |" if has_beyond else ""
        lines.append(f"| {r.query_chunk} | {r.key_chunk} | {_mib(r.temp)} |{extra} {r.temp / rows[0].temp:.2f} |")
    return lines


def _sign_note(model: dict) -> str:
    """What a negative fitted coefficient means: that term is absent, not that memory shrinks."""
    neg = [name for name, what in (("B", "key of a chunk"), ("C", "key chunk")) if model[name] < 0]
    if not neg:
        return ""
    return (f" ({' and '.join(neg)} < 0: the fit finds no per-{'key' if neg == ['B'] else 'key-chunk'} term at all; "
            "a small negative value is the least-squares residual of a term that is absent, not memory that shrinks)")


def summary(doc: dict) -> list[str]:
    """A few lines for the terminal: fitted exponents, the dense / chunked ratios, where the report is."""
    lines = []
    for e in doc["exponents"]:
        if e["exponent"] is not None:
            lines.append(f"{e['target']} {e['pass']} {e['policy']}: `{e['measure']}` grows like L^{e['exponent']:.2f} "
                         f"over L = {e['lengths'][0]}..{e['lengths'][-1]}")
    for r in doc["ratios"]:
        lines.append(f"dense / chunked {r['pass']} {r['policy']} at L = {r['length']} ({r['measure']}): "
                     f"{r['ratio']:.1f}x (paper: {r['paper_ratio']:.0f}x at L = {r['paper_length']})")
    return lines


def _answer(sweep: Sequence[Row], models: dict) -> list[str]:
    """The seed question's answer in measured numbers."""
    lines = []
    for pass_ in PASSES:
        qs, ks = sweeps(sweep, pass_)
        model = models.get(pass_)
        if len(qs) < 2 or model is None:
            continue
        mq = measure_of(qs)
        first, last = getattr(qs[0], mq), getattr(qs[-1], mq)
        slope = fit_exponent([r.query_chunk for r in qs], [getattr(r, mq) for r in qs])
        best = ""
        if model["B"] > 0 and model["C"] > 0:
            optimum = math.sqrt(model["C"] * model["length"] / model["B"])
            best = f"; smallest at key_chunk = sqrt(C * L / B) = {optimum:.0f}"
        lines.append(
            f"- **{pass_}**, L = {qs[0].length}. Query chunk {qs[0].query_chunk} -> {qs[-1].query_chunk} "
            f"(x{qs[-1].query_chunk / qs[0].query_chunk:.0f}) at key chunk {qs[0].key_chunk}: `{mq}` "
            f"{_mib(first)} -> {_mib(last)} MiB (x{last / first:.1f}; log-log slope {slope:.2f} in the query chunk). "
            f"Key chunk {ks[0].key_chunk} -> {ks[-1].key_chunk} at query chunk {model['query_chunk']}: "
            f"`{model['measure']}` {_mib(getattr(ks[0], model['measure']))} -> "
            f"{_mib(getattr(ks[-1], model['measure']))} MiB; least squares "
            f"A + B * key_chunk + C * ceil(L / key_chunk) gives A = {_mib(round(model['A']))} MiB "
            f"({model['A_per_row']:.0f} B per query row), B = {model['B_per_row']:.1f} B per query row and key, "
            f"C = {model['C_per_row']:.1f} B per query row and key chunk{best}.{_sign_note(model)}"
        )
    if lines:
        lines += [
            "",
            "So memory ~ query_chunk x (a + b * key_chunk + c * L / key_chunk), with a, b, c the per-row figures "
            "above: the query chunk multiplies every per-chunk buffer (the query_chunk x key_chunk logits block, "
            "the query_chunk x D accumulators, and one summary or carry per key chunk where c > 0), so memory "
            "is linear in it. The number of query chunks, L / query_chunk, does not appear: query chunks run one "
            "after another and reuse the same buffers. With the query chunk fixed (the paper's listing uses "
            "1024, a constant independent of n) and key_chunk = sqrt(L), both b * key_chunk and c * L / key_chunk "
            "grow like sqrt(L) (c is the listing's sqrt(n) summaries of query_chunk x Dv; a loop that folds each "
            "key chunk into a running max, sum and accumulator has c ~ 0 in the forward), so memory is "
            "O(query_chunk * sqrt(L)) = O(sqrt(L)): the query chunk is a constant factor, which is why the "
            "paper's O(sqrt(n)) omits it. The L-independent part a keeps a fitted exponent in L below 0.5 until "
            "(b + c) * sqrt(L) >> a.",
        ]
    return lines


def write_report(out_dir: Path, meta: dict, rows: Sequence[Row], sweep: Sequence[Row],
                 ratio_rows: Sequence[dict]) -> dict:
    """memory.json, memory.md and memory.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {p: m for p in PASSES if (m := chunk_model(sweeps(sweep, p)[1])) is not None}
    doc = {"schema_version": SCHEMA_VERSION, **meta, "rows": [_row_dict(r) for r in rows],
           "exponents": exponents(rows), "ratios": list(ratio_rows), "sweep": [_row_dict(r) for r in sweep],
           "chunk_model": models}
    (out_dir / "memory.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = [f"# Memory against sequence length: {meta['target']}", "",
          f"B={meta['batch']} H={meta['heads']} D={meta['dim']} {meta['dtype']}, Lq = Lk = L; "
          f"{meta['framework']} on {meta['device']}. Bytes shown in MiB. Measures:", ""]
    md += [f"- `{k}`: {v}" for k, v in meta["measures"].items()]
    md += ["", "Exponent: least-squares slope of log(bytes) against log(L) over the lengths shown.", ""]
    for pass_ in PASSES:
        for measure_name in meta["measures"]:
            table = _length_table(rows, pass_, measure_name)
            if table:
                md += [f"## {pass_}: `{measure_name}` (MiB)", "", *table, ""]
    if ratio_rows:
        md += ["## Dense / chunked", "",
               "| pass | policy | L | measure | dense MiB | chunked MiB | ratio | paper (L = 16384) |",
               "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        md += [f"| {r['pass']} | {r['policy']} | {r['length']} | {r['measure']} | {_mib(r['dense'])} | "
               f"{_mib(r['chunked'])} | {r['ratio']:.1f}x | {r['paper_ratio']:.0f}x |" for r in ratio_rows]
        md.append("")
    if sweep:
        for pass_ in PASSES:
            for name, part, vary in zip(("query chunk", "key chunk"), sweeps(sweep, pass_),
                                        ("query_chunk", "key_chunk"), strict=True):
                table = _sweep_table(part, vary)
                if table:
                    md += [f"## {pass_}, L = {sweep[0].length}: varying the {name}", "", *table, ""]
        md += ["## How memory depends on the query and key chunk sizes", "",
               *_answer(sweep, models), ""]
    (out_dir / "memory.md").write_text("\n".join(md).rstrip() + "\n")
    _plot(out_dir / "memory.png", rows, sweep, meta)
    return doc


def _row_dict(r: Row) -> dict:
    d = asdict(r)
    d["pass"] = d.pop("pass_")
    return d


def _plot(path: Path, rows: Sequence[Row], sweep: Sequence[Row], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 if sweep else 1, 2, figsize=(12, 9 if sweep else 4.8), squeeze=False)
    for ax, pass_ in zip(axes[0], PASSES, strict=True):
        for key in dict.fromkeys((r.target, r.policy) for r in rows if r.pass_ == pass_):
            group = sorted((r for r in rows if (r.target, r.policy, r.pass_) == (*key, pass_)), key=lambda r: r.length)
            (line,) = ax.loglog([r.length for r in group], [r.temp for r in group], "o-", label=f"{key[0]} {key[1]}")
            if any(r.beyond is not None for r in group):
                ax.loglog([r.length for r in group], [r.beyond for r in group], "x--", color=line.get_color(),
                          label=f"{key[0]} {key[1]} (beyond)")
        ax.set(title=f"{pass_}: temporary memory", xlabel="sequence length L", ylabel="bytes")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    if sweep:
        for ax, prefix, vary in zip(axes[1], ("q-sweep", "k-sweep"), ("query_chunk", "key_chunk"), strict=True):
            for pass_ in PASSES:
                group = sorted((r for r in sweep if r.pass_ == pass_ and r.policy.startswith(prefix)),
                               key=lambda r: getattr(r, vary))
                if group:
                    xs = [getattr(r, vary) for r in group]
                    (line,) = ax.loglog(xs, [r.temp for r in group], "o-", label=f"{pass_} temp")
                    if all(r.beyond is not None for r in group):
                        ax.loglog(xs, [r.beyond for r in group], "x--", color=line.get_color(), label=f"{pass_} beyond")
            fixed = "key chunk" if vary == "query_chunk" else "query chunk"
            ax.set(title=f"L = {sweep[0].length}, {fixed} fixed", xlabel=vary.replace("_", " "), ylabel="bytes")
            ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{meta['target']}: B={meta['batch']} H={meta['heads']} D={meta['dim']} {meta['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
