"""Shared fixtures for the model tests: the committed model versions and phantom slices."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.registry.manifest import Manifest

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def manifest_paths() -> list[Path]:
    return sorted(MODELS_DIR.glob("*/*/manifest.json"))


def load(path: Path) -> Manifest:
    return Manifest.model_validate_json(path.read_text())


@pytest.fixture(scope="session")
def shipped() -> dict[str, tuple[Manifest, Path]]:
    """name → (manifest, version directory) of the served version of each model under
    ``models/`` (its newest release: what a bare model name and the default set resolve to)."""
    from app.registry.service import latest_versions, load_registry

    out = {
        name: (model.manifest, model.folder)
        for name, model in latest_versions(load_registry(MODELS_DIR)).items()
    }
    if not out:
        pytest.fail("no model manifests under models/")
    return out
