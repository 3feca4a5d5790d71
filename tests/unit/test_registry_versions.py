"""Which version a bare model name and the default set resolve to (real manifests on disk)."""

from __future__ import annotations

import json
from pathlib import Path

from app.registry.service import load_registry, resolve_models
from tests.fixtures.tiny_models import build_threshold_segmenter


def _not_default(root: Path, version: str) -> None:
    manifest = root / "tinyseg" / version / "manifest.json"
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), default=False)))


def test_newest_release_wins_and_an_int8_variant_never_becomes_latest(tmp_path: Path) -> None:
    for version in ("1.0.0", "1.0.0-int8", "1.1.0", "1.1.0-int8", "1.9.0-rc1"):
        build_threshold_segmenter(tmp_path, version=version)
    for version in ("1.0.0-int8", "1.1.0-int8", "1.9.0-rc1"):
        _not_default(tmp_path, version)
    registry = load_registry(tmp_path)

    defaults = resolve_models(registry, None)
    assert [m.manifest.key for m in defaults] == ["tinyseg:1.1.0"]
    assert [m.manifest.key for m in resolve_models(registry, ["tinyseg"])] == ["tinyseg:1.1.0"]
    # a variant or an older release only when named with its version
    named = resolve_models(registry, ["tinyseg:1.1.0-int8"])
    assert [m.manifest.key for m in named] == ["tinyseg:1.1.0-int8"]
    assert [m.manifest.key for m in resolve_models(registry, ["tinyseg:1.0.0"])] == [
        "tinyseg:1.0.0"
    ]


def test_numeric_parts_compare_as_numbers(tmp_path: Path) -> None:
    for version in ("1.9.0", "1.10.0"):
        build_threshold_segmenter(tmp_path, version=version)
    assert [m.manifest.key for m in resolve_models(load_registry(tmp_path), ["tinyseg"])] == [
        "tinyseg:1.10.0"
    ]


def test_default_set_takes_the_newest_default_version(tmp_path: Path) -> None:
    for version in ("1.0.0", "2.0.0"):
        build_threshold_segmenter(tmp_path, version=version)
    _not_default(tmp_path, "2.0.0")  # shipped for opt-in: named, it is served
    registry = load_registry(tmp_path)
    assert [m.manifest.key for m in resolve_models(registry, None)] == ["tinyseg:1.0.0"]
    assert [m.manifest.key for m in resolve_models(registry, ["tinyseg"])] == ["tinyseg:2.0.0"]
