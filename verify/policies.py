"""Masked-row policies by mechanism: what a target returns for a row with no visible key.

A target declares one policy (``zeros``, ``nan``, ``uniform``: ``oracles.spec``), or one per
mechanism that emptied the row, written ``mask:uniform,bias:nan``: ``mask`` is a row every key of
which is hidden by the boolean mask, causal masking, a window or segment ids (a kernel that fills
masked logits with ``finfo.min`` averages the values there); ``bias`` is a row that a ``-inf`` bias
empties (alone, or completing a mask) -- a kernel that adds the bias as is gets NaN there.

``row_policies`` splits a case's empty rows by the policy that governs them; ``apply`` turns exact
values computed under ``zeros`` into those of the declared per-mechanism policies (``uniform``: the
mean of all values of the kv head, lse -inf, dv receives ``g / Lk``; ``nan``: NaN in the row's
output, lse and dq, in its kv head's dk and dv, in the dbias entries it reaches and in its head's
dsinks), the same rules ``oracles.mp`` and ``oracles.naive`` apply for a single policy.
``undefined_rows`` finds the rows ``uniform`` cannot define (a -inf bias completing a mask): a case with
such a row is not run and counts as declined, with ``UNDEFINED`` as its reason.
"""

from __future__ import annotations

import numpy as np

from oracles import spec
from verify.case import Case

MECHANISMS = ("mask", "bias")


def parse(text: str) -> dict[str, str]:
    """``"zeros"`` -> both mechanisms zeros; ``"mask:uniform,bias:nan"`` -> per mechanism; ValueError if bad."""
    if ":" not in text:
        if text not in spec.MASKED_ROW_POLICIES:
            raise ValueError(f"unknown masked-row policy {text!r}; known: {', '.join(spec.MASKED_ROW_POLICIES)} "
                             "or mask:POLICY,bias:POLICY")
        return dict.fromkeys(MECHANISMS, text)
    out = {}
    for part in text.split(","):
        mech, _, policy = part.strip().partition(":")
        if mech not in MECHANISMS or policy not in spec.MASKED_ROW_POLICIES or mech in out:
            raise ValueError(f"bad masked-row policy {text!r}: write mask:POLICY,bias:POLICY with POLICY one of "
                             f"{', '.join(spec.MASKED_ROW_POLICIES)}")
        out[mech] = policy
    missing = [m for m in MECHANISMS if m not in out]
    if missing:
        raise ValueError(f"masked-row policy {text!r} says nothing for {', '.join(missing)}")
    return out


def single(text: str) -> str | None:
    """The one policy of a declaration that gives every mechanism the same, else None."""
    policies = set(parse(text).values())
    return policies.pop() if len(policies) == 1 else None


def row_policies(case: Case, att: spec.Attention, text: str) -> dict[str, np.ndarray]:
    """bool [B, Hq, Lq] per policy: the empty rows of ``case`` it governs (``att`` is the case normalized)."""
    policy = parse(text)
    rows = att.masked_row
    out = {p: np.zeros(rows.shape, bool) for p in spec.MASKED_ROW_POLICIES}
    if policy["mask"] == policy["bias"] or not rows.any():
        out[policy["mask"]] = rows
        return out
    by_bias = rows & _structural(case).any(-1)  # a key was visible until the -inf bias hid it
    out[policy["bias"]] |= by_bias
    out[policy["mask"]] |= rows & ~by_bias
    return out


UNDEFINED = ("uniform masked-row policy undefined where a -inf bias completes a mask (which keys a fill "
             "reaches, all masked ones or only those of finite bias, is the kernel's choice)")


def undefined_rows(case: Case, text: str) -> int:
    """Empty rows of ``case`` whose value the declared policies leave to the kernel (0: every row is defined).

    Under ``uniform`` for the bias mechanism, a row that a -inf bias empties where a mask hid the other keys
    gets the mean of the masked keys' values from a kernel that replaces masked logits by a fill, and of
    the masked keys of finite bias from one that adds the fill: both are "what a fill computes". A row that
    the bias alone empties (no key masked) stays defined: the mean of all values.
    """
    if parse(text)["bias"] != "uniform" or case.bias is None or not np.isneginf(case.bias.astype(float)).any():
        return 0
    rows = spec.normalize(case.q, case.k, case.v, **case.semantics()).masked_row
    if not rows.any():
        return 0
    structural = _structural(case)
    return int((rows & structural.any(-1) & ~structural.all(-1)).sum())


def _structural(case: Case) -> np.ndarray:
    """bool [B, Hq, Lq, Lk]: the keys each query sees before any bias (mask, causal, window, segments)."""
    return spec.normalize(case.q, case.k, case.v, **dict(case.semantics(), bias=None)).visible


def apply(case: Case, text: str, out: np.ndarray, lse: np.ndarray, grads: dict[str, np.ndarray] | None) -> None:
    """Turn values computed under ``zeros`` into the declared policies' (in place; see the module doc)."""
    att = spec.normalize(case.q, case.k, case.v, **case.semantics())
    rows = row_policies(case, att, text)
    g = case.g
    uniform, nan = rows["uniform"], rows["nan"]
    if uniform.any():
        v = spec.to_heads_first(att.v.astype(np.float64))[:, att.kv_head]  # [B, Hq, Lk, Dv]
        mean = np.broadcast_to(v.mean(axis=2, keepdims=True), uniform.shape + (v.shape[-1],))
        sel = np.swapaxes(uniform, 1, 2)  # [B, Lq, Hq]
        out[sel] = np.swapaxes(mean, 1, 2)[sel]
        if grads is not None and g is not None:
            gsum = np.where(sel[..., None], g.astype(np.float64), 0.0).sum(axis=1)  # [B, Hq, Dv]
            per_kv = np.zeros((gsum.shape[0], att.k.shape[2], gsum.shape[-1]))
            np.add.at(per_kv, (slice(None), att.kv_head), gsum)
            grads["dv"] = grads["dv"] + per_kv[:, None] / att.k.shape[1]
    if nan.any():
        sel = np.swapaxes(nan, 1, 2)
        out[sel] = np.nan
        lse[nan] = np.nan
        if grads is not None:
            grads["dq"][sel] = np.nan
            heads = nan.any(axis=2)  # [B, Hq]
            kv = np.zeros((heads.shape[0], att.k.shape[2]), bool)
            np.logical_or.at(kv, (slice(None), att.kv_head), heads)
            for name in ("dk", "dv"):
                grads[name][np.broadcast_to(kv[:, None, :, None], grads[name].shape)] = np.nan
            if "dbias" in grads:
                hit = spec.reduce_to_shape(np.broadcast_to(nan[..., None], att.visible.shape).astype(float),
                                           att.bias_shape)
                grads["dbias"] = np.where(hit > 0, np.nan, grads["dbias"])
            if "dsinks" in grads:
                grads["dsinks"] = np.where(heads.any(axis=0), np.nan, grads["dsinks"])
