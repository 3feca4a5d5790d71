"""Fixtures of the fault tests: one production-shaped deployment shared by the queue tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.queue_scenarios import ProdStack, production_stack


@pytest.fixture(scope="module")
def prod(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[ProdStack]:
    """PostgreSQL cluster + redis-server of our own, API and a 2-child prefork worker."""
    with production_stack(tmp_path_factory.mktemp("prod"), tiny_models_dir) as ps:
        yield ps


@pytest.fixture
def healthy(prod: ProdStack) -> Iterator[ProdStack]:
    """The shared deployment, repaired after a test that left part of it down."""
    prod.ensure_healthy()
    yield prod
    prod.ensure_healthy()
