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
    """name → (manifest, version directory) of the trained 1.0.0 models under ``models/``."""
    out = {}
    for p in manifest_paths():
        m = load(p)
        if m.version == "1.0.0":
            out[m.name] = (m, p.parent)
    if not out:
        pytest.fail("no model manifests under models/")
    return out
