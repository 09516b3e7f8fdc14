"""pytest plugin: ``pytest --attnverify-target=T`` adds one test item per dtype × check.

A kernel repository gates its PRs with its own pytest (and ``--junitxml``): each item runs a
fuzz campaign for one dtype and one check and fails with the findings' messages, each of which
ends with the ``attnverify repro`` command. Profiles: ``ci`` (seeded, bounded: the default) and
``nightly`` (random seed, large budget). Without ``--attnverify-target`` the plugin does nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PROFILES = {"ci": {"seed": 0, "max_examples": 100}, "nightly": {"seed": None, "max_examples": 5000}}


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("attnverify", "attnverify: fuzz an attention implementation")
    g.addoption("--attnverify-target", help="bundled target name or package.module:function")
    g.addoption("--attnverify-framework", choices=("torch", "jax", "numpy"))
    g.addoption("--attnverify-features", help="comma list of declared features (user targets)")
    g.addoption("--attnverify-masked-rows", help="declared masked-row policy (user targets)")
    g.addoption("--attnverify-dtypes", default="bf16,fp16,fp32")
    g.addoption("--attnverify-checks", default="forward,grad")
    g.addoption("--attnverify-profile", choices=tuple(PROFILES), default="ci")
    g.addoption("--attnverify-max-examples", type=int, help="per dtype; overrides the profile")
    g.addoption("--attnverify-tolerance", choices=("bound", "naive"), default="bound")
    g.addoption("--attnverify-repro-dir", default="findings")


class AttnverifyItem(pytest.Item):
    """One campaign: a target, one dtype, one check."""

    def __init__(self, *, dtype: str, check: str, **kw) -> None:
        super().__init__(**kw)
        self.dtype, self.check = dtype, check

    def runtest(self) -> None:
        from verify import fuzz
        from verify.targets import Unavailable, load

        opt = self.config.getoption
        features = opt("attnverify_features")
        try:
            adapter = load(
                opt("attnverify_target"), framework=opt("attnverify_framework"),
                features=features.split(",") if features else None, masked_rows=opt("attnverify_masked_rows"),
            )
        except Unavailable as exc:
            pytest.skip(str(exc))
        if self.dtype not in adapter.info.dtypes:
            pytest.skip(f"{adapter.info.name} does not declare {self.dtype}")
        if self.check == "grad" and "grad" not in adapter.info.features:
            pytest.skip(f"{adapter.info.name} does not declare grad")
        profile = PROFILES[opt("attnverify_profile")]
        sett = fuzz.Settings(
            dtypes=(self.dtype,), checks=(self.check,), seed=profile["seed"],
            max_examples=opt("attnverify_max_examples") or profile["max_examples"],
            policy=opt("attnverify_tolerance"), repro_dir=Path(opt("attnverify_repro_dir")),
        )
        camp = fuzz.run(adapter, sett)
        if camp.findings:
            raise AttnverifyFailure("\n\n".join(f.message() for f in camp.findings))

    def repr_failure(self, excinfo: pytest.ExceptionInfo, style=None) -> str:
        if isinstance(excinfo.value, AttnverifyFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[str, int, str]:
        return "attnverify", 0, self.name


class AttnverifyFailure(Exception):
    """Findings of one campaign item."""


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    target = config.getoption("attnverify_target")
    if not target:
        return
    for dtype in config.getoption("attnverify_dtypes").split(","):
        for check in config.getoption("attnverify_checks").split(","):
            items.append(AttnverifyItem.from_parent(session, name=f"attnverify[{target}-{dtype}-{check}]",
                                                    dtype=dtype.strip(), check=check.strip()))
