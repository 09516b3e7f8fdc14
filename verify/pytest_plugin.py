"""pytest plugin: ``pytest --attnverify-target=T`` adds one test item per dtype × check.

A kernel repository gates its PRs with its own pytest (and ``--junitxml``): each item runs a fuzz
campaign for one dtype and one check and fails with the findings' messages, each of which ends
with the ``attnverify repro`` command. The items are collected like ordinary tests (they count in
"collected N items", ``-k`` selects them). Targets are found the way the command line finds them
(the working directory and the rootdir are importable) and take the same declaration flags,
prefixed ``--attnverify-``; a target that cannot be imported is one line of error, not a
traceback. A seeded item draws exactly the cases ``attnverify fuzz --dtypes D --checks C`` draws.

Profiles: ``ci`` (seeded, bounded: the default) and ``nightly`` (random seed, large budget).
Without ``--attnverify-target`` the plugin does nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from verify.targets import TARGET_OPTIONS, TargetError, TargetSpec, Unavailable
from verify.targets.loader import Option

PROFILES = {"ci": {"seed": 0, "max_examples": 100}, "nightly": {"seed": None, "max_examples": 5000}}
PREFIX = "attnverify_declared_"  # dests of the declaration flags (apart from the run options)


def pytest_addoption(parser: pytest.Parser) -> None:
    from verify import fuzz
    from verify.checks import CHECKS
    from verify.tolerance import POLICIES

    S = fuzz.Settings()
    g = parser.getgroup("attnverify", "attnverify: fuzz an attention implementation")
    g.addoption("--attnverify-target", help="bundled target name or package.module:function")
    for opt in TARGET_OPTIONS:
        dest = PREFIX + opt.field
        if opt.kind == "bool":
            g.addoption(f"--attnverify-{opt.flag}", dest=dest, action="store_const", const=True, help=opt.help)
            g.addoption(f"--attnverify-no-{opt.flag}", dest=dest, action="store_const", const=False)
        else:
            g.addoption(f"--attnverify-{opt.flag}", dest=dest, choices=opt.choices, help=opt.help)
    g.addoption("--attnverify-dtypes", default=",".join(S.dtypes))
    g.addoption("--attnverify-checks", default=",".join(S.checks), help=f"of {','.join(CHECKS)}")
    g.addoption("--attnverify-profile", choices=tuple(PROFILES), default="ci")
    g.addoption("--attnverify-max-examples", type=int, help="target runs per item; overrides the profile")
    g.addoption("--attnverify-seed", type=int, help="overrides the profile's seed")
    g.addoption("--attnverify-tolerance", choices=POLICIES, default=S.policy)
    g.addoption("--attnverify-timeout", type=float, default=S.timeout, help="seconds per target call")
    g.addoption("--attnverify-max-len", type=int, default=S.max_len, help="longest sequence of a large case")
    g.addoption("--attnverify-max-dim", type=int, default=S.max_dim, help="largest head dim drawn")
    g.addoption("--attnverify-repro-dir", default=str(S.repro_dir))
    g.addoption("--attnverify-database", default=str(S.database), help="Hypothesis example database ('' : none)")
    g.addoption("--attnverify-json", help="directory for each item's campaign JSON")
    g.addoption("--attnverify-in-process", action="store_true", help="run the target in pytest's process")


def _parsed(option: Option, value: str) -> object:
    """A declaration flag's value as ``TargetSpec`` takes it (comma lists as tuples, of ints for ``ints``)."""
    if option.kind not in ("csv", "ints"):
        return value
    items = tuple(x.strip() for x in value.split(",") if x.strip())
    if option.kind == "csv":
        return items
    try:
        return tuple(int(x) for x in items)
    except ValueError:
        raise pytest.UsageError(f"--attnverify-{option.flag}: expected comma-separated integers, "
                                f"got {value!r}") from None


def _spec(config: pytest.Config) -> TargetSpec:
    opt = config.getoption
    declared = {}
    for o in TARGET_OPTIONS:
        value = opt(PREFIX + o.field)
        if value is not None:
            declared[o.field] = _parsed(o, value)
    return TargetSpec(opt("attnverify_target"), **declared)


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("attnverify_target"):
        return
    for path in (os.getcwd(), str(config.rootpath)):  # user targets import the way the command line finds them
        if path not in sys.path:
            sys.path.insert(0, path)


class AttnverifyCollector(pytest.Collector):
    """The items of one target: a campaign per dtype × check."""

    def collect(self) -> list[pytest.Item]:
        config = self.config
        items = []
        for dtype in _csv(config.getoption("attnverify_dtypes")):
            for check in _csv(config.getoption("attnverify_checks")):
                items.append(AttnverifyItem.from_parent(self, name=f"{dtype}-{check}", dtype=dtype, check=check))
        return items


class AttnverifyItem(pytest.Item):
    """One campaign: a target, one dtype, one check."""

    def __init__(self, *, dtype: str, check: str, **kw) -> None:
        super().__init__(**kw)
        self.dtype, self.check = dtype, check

    def runtest(self) -> None:
        from verify import fuzz

        config = self.config
        opt = config.getoption
        try:
            adapter = _spec(config).load()
        except Unavailable as exc:
            pytest.skip(str(exc))
        if self.dtype not in adapter.info.dtypes:
            pytest.skip(f"{adapter.info.name} does not declare {self.dtype}")
        if self.check == "grad" and "grad" not in adapter.info.features:
            pytest.skip(f"{adapter.info.name} does not declare grad")
        profile = PROFILES[opt("attnverify_profile")]
        seed = opt("attnverify_seed") if opt("attnverify_seed") is not None else profile["seed"]
        database = opt("attnverify_database")
        sett = fuzz.Settings(
            dtypes=(self.dtype,), checks=(self.check,), seed=seed,
            max_examples=opt("attnverify_max_examples") or profile["max_examples"],
            policy=opt("attnverify_tolerance"), timeout=opt("attnverify_timeout"), max_len=opt("attnverify_max_len"),
            max_dim=opt("attnverify_max_dim"),
            database=Path(database) if database else None, repro_dir=Path(opt("attnverify_repro_dir")),
            isolate=not opt("attnverify_in_process"))
        json_dir = opt("attnverify_json")
        json_path = Path(json_dir) / f"{self.dtype}-{self.check}.json" if json_dir else None
        camp = fuzz.run(adapter, sett, json_path=json_path)
        if camp.findings:
            raise AttnverifyFailure("\n\n".join(f.message() for f in camp.findings))

    def repr_failure(self, excinfo: pytest.ExceptionInfo, style=None) -> str:
        if isinstance(excinfo.value, AttnverifyFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[str, int, str]:
        return "attnverify", 0, self.nodeid


class AttnverifyFailure(Exception):
    """Findings of one campaign item."""


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Add the target's items as a collected node (before -k and -m selection run)."""
    target = config.getoption("attnverify_target")
    if not target:
        return
    try:
        spec = _spec(config)
        spec.load()
    except TargetError as exc:
        raise pytest.UsageError(f"attnverify: {exc}") from None
    except Unavailable:
        pass  # the items skip, each saying why
    name = f"attnverify[{spec.name}]"
    collector = AttnverifyCollector.from_parent(session, name=name, nodeid=name)
    new = collector.collect()
    config.hook.pytest_collectreport(report=pytest.CollectReport(collector.nodeid, "passed", None, new))
    items.extend(new)
