"""report.md and index.html: the sweep's tables, its campaign's findings, the gate's verdict.

Entries are written for someone deciding whether a kernel is fine: the worst error **in
allowances** (``|got - exact| / allowance``: above 1 a fuzz check calls it a finding, so each entry
says pass or fail by itself), the **ratio to a plain same-dtype implementation** (the FlashAttention
rule's quantity: about 1 or below for a correct kernel at any chunk count, growing with the chunk
count for one that accumulates or rescales badly), and in report.json every raw figure, u·A units
included. Each table says which reference decided its columns. A sweep of several softcaps or windows
adds a summary per dtype and softcap (window), whose rows compare the same inputs.
"""

from __future__ import annotations

import html
import math

from oracles import spec
from verify import policies
from verify.accuracy.gate import chunk_label, fmt, regression_lines, verdict
from verify.accuracy.plan import key_chunks, softcap_label, window_label

GRADS = ("dq", "dk", "dv", "dbias")
PLOTS = {
    "ratio_vs_key_chunks.png": "Error relative to a plain same-dtype implementation against the number of key "
    "chunks, per dtype and value family (solid: output, dashed: gradients; 1 = as accurate as the plain one)",
    "allowance_heatmap.png": "Worst output error in allowances, query chunk × key chunk, at the largest length "
    "(above 1: a finding)",
    "allowance_vs_length.png": "Worst error in allowances against sequence length, per dtype (solid: output, "
    "dashed: gradients; the line at 1 is the allowance)",
}
OPTION_AXES = {"softcap": softcap_label, "window": window_label}
OPTION_NOTES = {"softcap": "softcap c: logits c·tanh(s/c), before bias (none: no cap)",
                "window": "window LEFT:RIGHT: query i sees keys i−LEFT … i+RIGHT (an empty side: unbounded), "
                          "intersected with the mask kind's keys"}
REFERENCE_NOTE = ("references: (mp) the exact mpmath oracle; (naive64) the float64 naive reference, used for long "
                  "sequences where it vouches for every row; (mixed) some seeds of each")


def worst(cells: list[dict], grads: bool, key: str) -> float | None:
    """The largest ``key`` figure over the outputs (or the gradients) of ``cells``."""
    vals = [f[key] for c in cells for n, f in c["outputs"].items() if (n in GRADS) == grads and f[key] is not None]
    return max(vals) if vals else None


def _mark(x: float | None) -> str:
    return fmt(x) + (" ✗" if x is not None and x > 1 else "")


def entry(cells: list[dict]) -> str:
    """``out / grads`` worst error in allowances (✗ beyond 1), then non-finite counts and target errors."""
    if not cells:
        return "·"
    text = _mark(worst(cells, False, "max_allow"))
    if any(n in GRADS for c in cells for n in c["outputs"]):
        text += " / " + _mark(worst(cells, True, "max_allow"))
    nonfinite = sum(f["nonfinite"] for c in cells for f in c["outputs"].values())
    errors = sum(c["errors"] for c in cells)
    return text + (f" ({nonfinite} non-finite)" if nonfinite else "") + (f" ({errors} target errors)" if errors else "")


def ratio_entry(cells: list[dict]) -> str:
    if not cells:
        return "·"
    text = fmt(worst(cells, False, "ratio"))
    if any(n in GRADS for c in cells for n in c["outputs"]):
        text += " / " + fmt(worst(cells, True, "ratio"))
    return text


def _sort(c: int | None) -> int:
    return -1 if c is None else c


def _verdict(cells: list[dict]) -> str:
    """``pass`` when every output of every cell is within its allowance, finite and without target errors."""
    ok = all(f["pass"] and not c["errors"] for c in cells for f in c["outputs"].values())
    return "pass" if ok else "FAIL"


def _swept(cells: list[dict]) -> list[str]:
    """The option axes (softcap, window) with more than one value in the report: they get their own tables."""
    return [axis for axis, label in OPTION_AXES.items() if len({label(c[axis]) for c in cells}) > 1]


def _over(items: list[str]) -> str:
    """``a, b and c``: what a table's entries are the worst over."""
    return ", ".join(items[:-1]) + " and " + items[-1]


def _option_table(cells: list[dict], dtypes: list[str], axis: str, swept: list[str]) -> dict:
    """Worst error in allowances and ratio to plain per dtype and value of ``axis`` (softcap or window)."""
    label = OPTION_AXES[axis]
    rows = []
    for dtype in dtypes:
        for value in dict.fromkeys(label(c[axis]) for c in cells):
            sel = [c for c in cells if c["dtype"] == dtype and label(c[axis]) == value]
            if sel:
                rows.append([dtype, value, entry(sel), ratio_entry(sel), _verdict(sel)])
    others = ["chunk sizes", "lengths", "families", "masks", *(f"{a}s" for a in swept if a != axis)]
    return {"title": f"Summary by dtype and {axis}", "header": ["dtype", axis, "worst error in allowances "
            "(out / grads)", "ratio to plain same-dtype (out / grads)", "verdict"], "rows": rows,
            "notes": [f"worst over {_over(others)}; the rows of a dtype compare the same inputs (a seed's q, k, v, "
                      f"mask and g do not depend on the {axis})", OPTION_NOTES[axis]]}


def tables(report: dict) -> list[dict]:
    """The report's tables as data (title, header, rows, notes), rendered to markdown and HTML alike."""
    cells = report["cells"]
    out = []
    dtypes = list(dict.fromkeys(c["dtype"] for c in cells))
    families = list(dict.fromkeys(c["family"] for c in cells))
    swept = _swept(cells)
    options = [f"{a}s" for a in swept]
    rows = []
    for dtype in dtypes:
        for family in families:
            sel = [c for c in cells if c["dtype"] == dtype and c["family"] == family]
            if sel:
                rows.append([dtype, family, entry(sel), ratio_entry(sel), _verdict(sel)])
    out.append({"title": "Summary by dtype and value family", "header": ["dtype", "family", "worst error in "
                "allowances (out / grads)", "ratio to plain same-dtype (out / grads)", "verdict"], "rows": rows,
                "notes": [f"worst over {_over(['chunk sizes', 'lengths', 'masks', *options])}"]})
    out += [_option_table(cells, dtypes, axis, swept) for axis in swept]
    for dtype in dtypes:
        mine = [c for c in cells if c["dtype"] == dtype]
        lengths = sorted({c["length"] for c in mine})
        pairs = sorted({(c["query_chunk"], c["key_chunk"]) for c in mine}, key=lambda k: (_sort(k[0]), _sort(k[1])))
        header = ["q chunk", "k chunk"]
        for length in lengths:
            refs = {c["reference"] for c in mine if c["length"] == length}
            header.append(f"L={length} ({refs.pop() if len(refs) == 1 else 'mixed'})")
        body = [[chunk_label(qc), chunk_label(kc)] + [entry([c for c in mine if (c["query_chunk"], c["key_chunk"])
                                                            == (qc, kc) and c["length"] == length])
                                                     for length in lengths] for qc, kc in pairs]
        failed = [s["error"] for c in mine for s in c["seeds"] if "error" in s]
        notes = [f"u = 2^{round(math.log2(spec.unit_roundoff(dtype)))}; entries: worst error in allowances, "
                 f"output / gradients, over {_over(['families', 'masks', *options])} (✗: beyond the allowance)",
                 REFERENCE_NOTE]
        if failed:
            notes.append(f"{len(failed)} target call(s) failed, first: {failed[0]}")
        declined = sum(c.get("declined", 0) for c in mine)
        if declined:
            notes.append(f"{declined} seed(s) not run: {policies.UNDEFINED}")
        out.append({"title": f"{dtype}: error in allowances by chunk sizes and length", "header": header,
                    "rows": body, "notes": notes})
        counts = sorted({key_chunks(c) for c in mine})
        body = [[family] + [ratio_entry([c for c in mine if c["family"] == family and key_chunks(c) == n])
                            for n in counts] for family in families]
        out.append({"title": f"{dtype}: ratio to a plain same-dtype implementation by number of key chunks",
                    "header": ["family", *[f"{n} chunk{'s' if n > 1 else ''}" for n in counts]], "rows": body,
                    "notes": [f"output / gradients, worst over {_over(['lengths', 'query chunks', 'masks', *options])}"
                              ": flat for a kernel whose accuracy does not depend on chunking"]
                    + (["rising: every key chunk raises the running max, so n chunks are n - 1 rescalings of "
                        "the accumulator: its row is error against the number of rescalings"]
                       if "rising" in families else [])})
    return out


def _intro(report: dict) -> list[str]:
    t, s = report["target"], report["settings"]
    c = t["contract"]
    sample = report["naive64_vs_mp"]
    worst64 = max(sample["max_error_in_A"].values(), default=None)
    skipped = s["skipped"]
    lines = [
        f"target **{t['name']}** ({t['framework']}/{t['device']}): {t['description']}",
        f"contract: accumulate={c['accumulate']}, round_logits={c['round_logits']}, round_probs={c['round_probs']}; "
        f"masked rows: {t['masked_rows']}; not exercised: {', '.join(t['unexercised']) or 'nothing'}",
        f"sweep: {len(report['cells'])} cells × {s['seeds']} seed(s); lengths {_join(s['lengths'])}; query chunks "
        f"{_join(s['query_chunks'])}; key chunks {_join(s['key_chunks'])} (own: the target's own chunking); "
        f"families {_join(s['families'])}; masks {_join(s['masks'])}"
        + "".join(f"; {a}s {_join(s[a + 's'])}" for a in OPTION_AXES if list(s[a + "s"]) != ["none"])
        + f"; B={s['batch']} H={s['heads']} D={s['head_dim']}",
        "an error in allowances is |got − exact| / allowance, the allowance being what a correct kernel under the "
        "declared contract may err by (verify/tolerance.py): above 1 a fuzz campaign reports a finding",
        f"{REFERENCE_NOTE}; mp is used up to L = {s['mp_max_len']}; naive64 against mp on {sample['cases']} cases: "
        f"max error {fmt(worst64)}·A",
    ]
    left_out = [f"{what} {_join(skipped[what])}" for what in ("dtypes", "masks", "softcaps", "windows")
                if skipped[what]] + ["; ".join(skipped["chunks"])]
    if any(left_out):
        lines.append("not run (undeclared or too many chunks): " + "; ".join(x for x in left_out if x))
    return lines


def _join(xs: list) -> str:
    return ",".join(str(x) for x in xs)


def _finding_lines(findings: list[dict]) -> list[str]:
    return [f"{f['category']} of {f['output']} in {f['dtype']} ({f['family']}, mask {f['mask_kind']}): "
            + (f"{f['ratio']:.3g} × allowance; " if f.get("ratio") is not None else "")
            + (f"`attnverify repro {f['case_file']}`" if f.get("case_file") else f["detail"]) for f in findings]


def to_markdown(report: dict, image_base: str | None = None) -> str:
    """report.md: intro, the campaign's findings, tables, the gate's verdict, the plots."""
    lines = [f"# Accuracy report: {report['target']['name']}", ""]
    lines += [f"- {x}" for x in _intro(report)] + [""]
    if "findings" in report:
        found = report["findings"]
        lines += ["## Findings of the fuzz campaign", ""]
        lines += [f"- {x}" for x in _finding_lines(found)] if found else ["none"]
        lines += [""]
    if "gate" in report:
        g = report["gate"]
        lines += ["## Baseline gate", "", verdict(g), ""] + [f"- {x}" for x in regression_lines(g)] + [""]
    for tab in tables(report):
        lines += [f"## {tab['title']}", "", "| " + " | ".join(tab["header"]) + " |",
                  "|" + " --- |" * len(tab["header"])]
        lines += ["| " + " | ".join(r) + " |" for r in tab["rows"]]
        lines += [""] + list(tab["notes"]) + [""]
    lines += ["## Plots", ""]
    if image_base:
        lines += [f"![{caption}]({image_base.rstrip('/')}/{name})" for name, caption in PLOTS.items()]
    else:
        lines += [f"- `{name}` (beside this file): {caption}" for name, caption in PLOTS.items()]
        lines += ["", "(`attnverify report --image-base URL` writes image links that render in a PR comment.)"]
    return "\n".join(lines) + "\n"


def to_html(report: dict) -> str:
    """index.html: the same content with the plots inline, plain HTML without external assets."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(report['target']['name'])} accuracy"
             "</title><style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
             "margin:8px 0}td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}img{max-width:100%}</style>"
             f"</head><body><h1>Accuracy report: {e(report['target']['name'])}</h1><ul>"]
    parts += [f"<li>{e(x.replace('**', ''))}</li>" for x in _intro(report)] + ["</ul>"]
    if "findings" in report:
        parts.append("<h2>Findings of the fuzz campaign</h2><ul>")
        parts += [f"<li>{e(x)}</li>" for x in _finding_lines(report["findings"])] or ["<li>none</li>"]
        parts.append("</ul>")
    if "gate" in report:
        g = report["gate"]
        parts.append(f"<h2>Baseline gate</h2><p>{e(verdict(g))}</p><ul>")
        parts += [f"<li>{e(x)}</li>" for x in regression_lines(g)] + ["</ul>"]
    for tab in tables(report):
        parts.append(f"<h2>{e(tab['title'])}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in tab["header"])
                     + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>" for r in tab["rows"]]
        parts.append("</table>" + "".join(f"<p>{e(n)}</p>" for n in tab["notes"]))
    for name, caption in PLOTS.items():
        parts.append(f"<h2>{e(caption)}</h2><img src='{name}' alt='{e(caption)}'>")
    return "".join(parts) + "</body></html>\n"
