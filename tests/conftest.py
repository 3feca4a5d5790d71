"""Shared fixtures: real SQLite/PostgreSQL/Redis, tiny ONNX fixture models, live medcad processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.tiny_models import build_models_dir
from tests.helpers.services import (
    ADMIN_KEY,
    MedcadProcesses,
    medcad_deployment,
    postgres_database,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODELS = REPO / "models"
ARTIFACTS = REPO / "test-artifacts"


def reset_caches() -> None:
    """Forget cached settings, engines and the queue producer (after env changes)."""
    from app import queue
    from app.api import deps
    from app.db.session import reset_engine
    from app.settings import get_settings

    get_settings.cache_clear()
    reset_engine()
    queue._producer.cache_clear()
    deps._store.cache_clear()


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding the two tiny fixture models."""
    return build_models_dir(tmp_path_factory.mktemp("tiny-models"))


def _configure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, models_dir: Path, database_url: str | None
) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for key in list(os.environ):
        if key.startswith("MEDCAD_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MEDCAD_DATA_DIR", str(data_dir))
    monkeypatch.setenv("MEDCAD_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("MEDCAD_ADMIN_API_KEY", ADMIN_KEY)
    if database_url:
        monkeypatch.setenv("MEDCAD_DATABASE_URL", database_url)
    reset_caches()
    from app.db.migrate import upgrade
    from app.settings import get_settings

    upgrade(get_settings().resolved_database_url)
    return data_dir


@pytest.fixture(params=["sqlite", "postgres"])
def medcad_env(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tiny_models_dir: Path,
) -> Iterator[str]:
    """In-process medcad configuration on SQLite and on a fresh PostgreSQL database."""
    if request.param == "postgres":
        with postgres_database() as url:
            _configure(monkeypatch, tmp_path, tiny_models_dir, url)
            yield request.param
            reset_caches()
    else:
        _configure(monkeypatch, tmp_path, tiny_models_dir, None)
        yield request.param
        reset_caches()


@pytest.fixture
def sqlite_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_models_dir: Path
) -> Iterator[Path]:
    """In-process medcad configuration on SQLite only; yields the data dir."""
    data_dir = _configure(monkeypatch, tmp_path, tiny_models_dir, None)
    yield data_dir
    reset_caches()


@pytest.fixture
def api(medcad_env: str) -> Iterator[object]:
    """A TestClient on the app, authenticated as admin (broker: filesystem, no worker)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        yield client


def _shipped_models_present() -> bool:
    return any(SHIPPED_MODELS.glob("*/*/manifest.json"))


@pytest.fixture(scope="session")
def medcad_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MedcadProcesses]:
    """A live ``medcad serve`` (API + embedded worker, SQLite, shipped models)."""
    if not _shipped_models_present():
        pytest.fail("the shipped models are missing under models/")
    with medcad_deployment(
        tmp_path_factory.mktemp("server"), SHIPPED_MODELS, MEDCAD_ORT_INTRA_OP_THREADS="2"
    ) as server:
        yield server


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few small phantom series from the demo-data generator."""
    from models.training.phantoms import write_demo_data

    out = tmp_path_factory.mktemp("demo")
    write_demo_data(out, n=3, seed=4242, n_slices=12)
    return out


@pytest.fixture(scope="session")
def demo_series_dir(demo_data_dir: Path) -> Path:
    """One phantom series folder."""
    return sorted(p for p in demo_data_dir.iterdir() if p.is_dir())[0]


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests save screenshots and reports (git-ignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
