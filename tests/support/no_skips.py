"""A pytest plugin: no test may be skipped or xfailed, so a green run means every test ran
and passed.

A skip reads as success in a run's exit code: a missing tool, capability or dependency on a
CI machine or a fresh checkout would silently turn a test off (it happened: the read-only
database tests skipped without root, and module-level ``importorskip`` would have skipped every
test of a module when one dependency was missing). So each skip, xfail or unexpected pass of an
xfail becomes a failure that names its reason, and a module skipped at import fails collection.
What a test needs that may be missing must either be provided (tests/support/file_faults.py) or
fail loudly (tests/dashboard/conftest.py).
"""

from __future__ import annotations

import pytest

HOW = "this suite allows no skipped or xfailed test (tests/support/no_skips.py)"


def _reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: why")
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report: pytest.TestReport = yield
    xfail = getattr(report, "wasxfail", None)
    if report.skipped or xfail is not None:
        if xfail is not None:
            del report.wasxfail
            why = f"xfail ({xfail or 'no reason'}), {'passed' if report.passed else 'failed'}"
        else:
            why = _reason(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{why}: {HOW}"
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    report: pytest.CollectReport = yield
    if report.skipped:
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped at collection, {_reason(report.longrepr)}: {HOW}"
    return report
