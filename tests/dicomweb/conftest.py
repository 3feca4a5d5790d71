"""One in-process medcad (SQLite, tiny models) shared by a test module: setup runs once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _configure, reset_caches
from tests.helpers.services import ADMIN_KEY


@pytest.fixture(scope="module")
def module_api(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Any]:
    """A TestClient authenticated as admin on a fresh SQLite medcad (no worker: tests run jobs
    in-process with ``workers.runner.run_job``)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with pytest.MonkeyPatch.context() as monkeypatch:
        _configure(monkeypatch, tmp_path_factory.mktemp("dicomweb"), tiny_models_dir, None)
        with TestClient(create_app(), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
            yield client
    reset_caches()
