"""Pytest fixtures for testing workflows, registered as the ``tenantflow`` plugin (a ``pytest11``
entry point) when tenantflow is installed. See docs/testing.md.

A top-level module rather than part of the ``tenantflow`` package (as hypothesis does with
``_hypothesis_pytestplugin``): pytest imports every installed plugin in every session, and
importing the package costs about 0.4 s that a session not testing workflows should not pay.

- ``tenantflow_app``: the App under test. Override it in your conftest.py.
- ``tenantflow_tenants``: the tenants created, ``["acme"]`` unless overridden.
- ``tenantflow_settings``: ``tenantflow.testing.fast_settings()`` under the test's ``tmp_path``;
  override it for another backend or other timings.
- ``tenantflow_env``: the running ``tenantflow.testing.Environment`` (async: needs pytest-asyncio,
  or anyio when pytest-asyncio is not active).

This module imports only pytest (and pytest-asyncio's fixture decorator, when installed); the
fixtures import tenantflow when a test asks for one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

try:
    # pytest-asyncio's strict mode (its default) runs only the async fixtures it declared; the
    # declaration is a plain pytest fixture too, which anyio runs when pytest-asyncio is off.
    from pytest_asyncio import fixture as async_fixture
except ImportError:  # anyio, or no async plugin at all (then the test says so)
    # pytest-asyncio's decorator takes a loop_scope too; only the bare form is used here.
    async_fixture = pytest.fixture  # type: ignore[assignment]

if TYPE_CHECKING:
    from tenantflow import App, Settings
    from tenantflow.testing import Environment


@pytest.fixture
def tenantflow_app() -> App:
    pytest.fail(
        "tenantflow_env needs the App under test: define a fixture named tenantflow_app "
        "in your conftest.py that returns it (see docs/testing.md)",
        pytrace=False,
    )


@pytest.fixture
def tenantflow_tenants() -> list[str]:
    return ["acme"]


@pytest.fixture
def tenantflow_settings(tmp_path: Path) -> Settings:
    from tenantflow.testing import fast_settings

    # Under tmp_path, so that pytest keeps a failed test's databases to look at.
    return fast_settings(tmp_path / "tenantflow")


@async_fixture
async def tenantflow_env(
    tenantflow_app: App, tenantflow_tenants: list[str], tenantflow_settings: Settings
) -> AsyncIterator[Environment]:
    from tenantflow.testing import environment

    async with environment(
        tenantflow_app, tenants=tenantflow_tenants, settings=tenantflow_settings
    ) as env:
        yield env
