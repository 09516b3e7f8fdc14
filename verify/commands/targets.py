"""``attnverify targets``: what can run here, with features, masked-row policy, contract and evidence."""

from __future__ import annotations

import argparse

from verify.commands.common import add_target_arguments, target_spec
from verify.targets import BUNDLED, TargetSpec, Unavailable


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("targets", help="list targets (bundled, or the one given)")
    add_target_arguments(p, required=False)


def run(args: argparse.Namespace) -> int:
    specs = [target_spec(args)] if args.target else [TargetSpec(name) for name in BUNDLED]
    for target in specs:
        try:
            adapter = target.load()
        except Unavailable as exc:
            print(f"{target.name:16s} unavailable: {exc}")
            continue
        info = adapter.info
        c = info.contract
        pad = " " * 16
        print(f"{info.name:16s} ok  {info.framework}/{info.device}  dtypes={','.join(info.dtypes)}")
        print(f"{pad}     features={','.join(sorted(info.features)) or '-'}"
              f"  not exercised={','.join(info.unexercised()) or '-'}")
        print(f"{pad}     masked-rows={info.masked_rows}  contract: accumulate={c.accumulate} "
              f"round_logits={c.round_logits} round_probs={c.round_probs}")
        limits = [f"constraints={','.join(sorted(info.constraints))}" if info.constraints else "",
                  f"tiles={','.join(map(str, info.tiles))}" if info.tiles else "",
                  f"empty-row lse={info.empty_lse}" if info.empty_lse else "",
                  "nondeterministic" if info.nondeterministic else ""]
        if any(limits):
            print(f"{pad}     {'  '.join(x for x in limits if x)}")
        if info.notes:
            print(f"{pad}     notes: {info.notes}")
    return 0
