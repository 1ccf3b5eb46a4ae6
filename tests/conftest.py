import os
import sys

import pytest
from hypothesis import HealthCheck, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

settings.register_profile(
    "dev", deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", deadline=None, max_examples=100, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run slow soak tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow soak test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _checked_invoke(invoke):
    """CliRunner.invoke that fails the test when walctl let an exception through.

    A command ends with SystemExit (click's exit, ``Error: ...``) or returns;
    any other exception in ``result.exception`` means an operator would have
    seen a traceback (without ``--debug``).
    """

    def checked(self, cli, args=None, *a, **k):
        result = invoke(self, cli, args, *a, **k)
        argv = [str(x) for x in (args or [])] if not isinstance(args, str) else args.split()
        if result.exception is not None and "--debug" not in argv:
            assert isinstance(result.exception, SystemExit), (
                f"walctl {' '.join(argv)} raised {result.exception!r} instead of exiting with an Error: line")
        return result

    return checked


from click.testing import CliRunner as _CliRunner  # noqa: E402

_CliRunner.invoke = _checked_invoke(_CliRunner.invoke)
