"""``tenantflow.testing`` and its pytest plugin, used the way a user's test suite uses them.

The example of docs/testing.md is run here as it is written, in a pytest of its own.
"""

from __future__ import annotations

import asyncio
import gc
import re
import textwrap
import warnings
from pathlib import Path

import pytest

from tenantflow import App, RunStatus, Settings, WorkflowContext
from tenantflow.testing import Environment, environment, fast_settings
from tests.conftest import run_python

pytest_plugins = ["pytester"]

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
# A fenced block whose first line names a file (``# conftest.py``) is a file of the example.
EXAMPLE_FILE = re.compile(r"```(?:python|toml)\n(?P<body># (?P<name>[\w.]+)\n.*?)```", re.S)

app = App("testing-module-tests")


@app.step
async def shout(text: str) -> str:
    return text.upper()


@app.workflow
async def echo(ctx: WorkflowContext, text: str) -> str:
    await ctx.sleep(0.05)  # durable: the run is released and woken again
    return await shout(text)


@pytest.fixture
def tenantflow_app() -> App:
    return app


# -- as a user's own tests would use it -------------------------------------------------------


async def test_the_fixture_runs_workflows(tenantflow_env: Environment) -> None:
    handle = await tenantflow_env.tenant("acme").start(echo, "hi")
    assert await handle.result(timeout=10) == "HI"
    assert [s.name for s in await handle.steps()] == ["sleep", "shout"]
    assert tenantflow_env.settings.lease_seconds == 2.0
    assert not tenantflow_env.worker.stopping


@pytest.mark.parametrize("tenantflow_tenants", [["acme", "globex"]])
async def test_the_tenants_are_overridable(tenantflow_env: Environment) -> None:
    assert {t.id for t in tenantflow_env.runtime.registry.list()} == {"acme", "globex"}


async def test_environment_cleans_up_after_itself() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with environment(app) as env:
            handle = await env.tenant("acme").start(echo, "bye")
            assert await handle.result(timeout=10) == "BYE"
            home = env.settings.home
            assert (home / "tenants" / "acme.db").exists()
        del env, handle
        gc.collect()  # an unclosed connection or socket says so when collected
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert not home.exists()


@app.step
async def stall() -> None:
    await asyncio.sleep(60)


@app.workflow
async def stuck(ctx: WorkflowContext) -> None:
    await stall()


async def test_a_step_left_running_does_not_hold_up_teardown() -> None:
    async with environment(app) as env:
        handle = await env.tenant("acme").start(stuck)
        while await handle.status() is not RunStatus.RUNNING:
            await asyncio.sleep(0.01)
        stopping = asyncio.get_running_loop().time()
    # Given its grace period (1 s) and given back, not waited for.
    assert asyncio.get_running_loop().time() - stopping < 4
    assert env.worker.stopping


async def test_tenantflow_variables_are_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A developer's shell pointing at a real database must not reach the test suite.
    monkeypatch.setenv("TENANTFLOW_DATABASE_URL", "postgresql://nobody@192.0.2.1:1/none")
    monkeypatch.setenv("TENANTFLOW_QUEUE_URL", "redis://192.0.2.1:1/0")
    monkeypatch.setenv("TENANTFLOW_LEASE_SECONDS", "999")
    settings = fast_settings(tmp_path, max_deliveries=3)
    assert settings.database_url is None and settings.queue_url is None
    assert (settings.lease_seconds, settings.max_deliveries) == (2.0, 3)
    async with environment(app, settings=settings) as env:
        handle = await env.tenant("acme").start(echo, "x")
        assert await handle.result(timeout=10) == "X"
    assert (tmp_path / "platform.db").exists()  # given settings: their home is kept


async def test_on_every_backend(settings: Settings) -> None:
    async with environment(app, tenants=["acme", "globex"], settings=settings) as env:
        handle = await env.tenant("globex").start(echo, "both")
        assert await handle.result(timeout=20) == "BOTH"
        assert await handle.status() is RunStatus.COMPLETED
        assert await env.tenant("acme").list_runs() == []


# -- what installing tenantflow costs a suite, and what the module needs ---------------------


def test_the_plugin_imports_no_tenantflow(tmp_path: Path) -> None:
    out = run_python(
        "-c",
        "import sys, _tenantflow_pytest; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tenantflow'))",
        cwd=tmp_path,
    )
    assert out.strip() == "[]"


def missing(*modules: str) -> str:
    """Python code after which ``modules`` cannot be imported, as if they were not installed."""
    return textwrap.dedent(
        f"""
        import sys
        from importlib.abc import MetaPathFinder

        class NotInstalled(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {set(modules)!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
                return None

        sys.meta_path.insert(0, NotInstalled())
        """
    )


# The extras are installed here; the hook makes them missing, as in a base install.
EXTRAS = ("redis", "hiredis", "psycopg", "uvloop", "opentelemetry")
BASE_INSTALL_SCRIPT = (
    missing(*EXTRAS)
    + f"""
import asyncio

from tenantflow import App, WorkflowContext
from tenantflow.testing import environment

app = App("base")

@app.step
def add(a: int, b: int) -> int:
    return a + b

@app.workflow
async def total(ctx: WorkflowContext, a: int, b: int) -> int:
    return await add(a, b)

async def main() -> None:
    async with environment(app) as env:
        handle = await env.tenant("acme").start(total, 2, 3)
        print("result", await handle.result(timeout=10))

asyncio.run(main())
print(sorted(m for m in sys.modules if m.split(".")[0] in {set(EXTRAS)!r}))
"""
)


def test_the_module_needs_only_the_base_install(tmp_path: Path) -> None:
    out = run_python("-c", BASE_INSTALL_SCRIPT, cwd=tmp_path)
    lines = out.splitlines()  # with the worker's log lines among them
    assert "result 5" in lines and lines[-1] == "[]", out


# -- the plugin in a user's pytest session ---------------------------------------------------


def example_files() -> dict[str, str]:
    files = {m["name"]: m["body"] for m in EXAMPLE_FILE.finditer(DOC.read_text())}
    assert set(files) == {"workflows.py", "conftest.py", "test_workflows.py", "pyproject.toml"}
    return files


def run_suite(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest in a process of its own, as a user runs it: plugins found by their entry points."""
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=120)


def test_the_documented_example_passes(pytester: pytest.Pytester) -> None:
    for name, body in example_files().items():
        (pytester.path / name).write_text(body)
    result = run_suite(pytester)
    result.assert_outcomes(passed=3)


def test_strict_mode_needs_only_the_marker(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(
        """
        [tool.pytest.ini_options]
        asyncio_mode = "strict"
        asyncio_default_fixture_loop_scope = "function"
        filterwarnings = ["error"]
        """
    )
    pytester.makepyfile(STRICT_AND_ANYIO_SUITE.replace("MARK", "asyncio"))
    run_suite(pytester).assert_outcomes(passed=1)


def test_anyio_runs_the_fixture_without_pytest_asyncio(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nfilterwarnings = ["error"]\n')
    pytester.makepyfile(STRICT_AND_ANYIO_SUITE.replace("MARK", "anyio"))
    run_suite(pytester, "-p", "no:asyncio").assert_outcomes(passed=1)
    # Not installed at all: the plugin declares the fixture with pytest's own decorator.
    out = run_python("-c", WITHOUT_PYTEST_ASYNCIO, cwd=pytester.path)
    assert "1 passed" in out, out


WITHOUT_PYTEST_ASYNCIO = (
    missing("pytest_asyncio")
    + """
import pytest
sys.exit(pytest.main(["-p", "no:asyncio", "-p", "no:cacheprovider"]))
"""
)


STRICT_AND_ANYIO_SUITE = """
import pytest

from tenantflow import App, WorkflowContext

app = App("marked")


@app.workflow
async def answer(ctx: WorkflowContext) -> int:
    return 42


@pytest.fixture
def tenantflow_app() -> App:
    return app


@pytest.mark.MARK
async def test_answer(tenantflow_env) -> None:
    handle = await tenantflow_env.tenant("acme").start(answer)
    assert await handle.result(timeout=10) == 42
"""


def test_a_missing_app_fixture_says_what_to_do(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nasyncio_mode = "auto"\n')
    pytester.makepyfile("async def test_it(tenantflow_env) -> None: ...")
    result = run_suite(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*define a fixture named tenantflow_app*"])
