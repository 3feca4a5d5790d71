"""The API's registry is re-read only when a manifest changes (tiny real manifests on disk)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from app.registry.service import current_registry
from tests.fixtures.tiny_models import build_threshold_segmenter


def test_registry_is_reused_until_a_manifest_changes(tmp_path: Path) -> None:
    build_threshold_segmenter(tmp_path)
    first = current_registry(tmp_path)
    again = current_registry(tmp_path)
    assert list(first) == ["tinyseg:1.0.0"]
    assert again is not first and again["tinyseg:1.0.0"] is first["tinyseg:1.0.0"]  # not re-read

    # a changed manifest (same size, newer mtime) is read again
    manifest = tmp_path / "tinyseg" / "1.0.0" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(data, description=data["description"].upper())))
    stat = manifest.stat()
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed = current_registry(tmp_path)
    assert changed["tinyseg:1.0.0"] is not first["tinyseg:1.0.0"]
    assert changed["tinyseg:1.0.0"].manifest.description == data["description"].upper()

    # a new version appears without a restart; a removed one disappears
    build_threshold_segmenter(tmp_path, version="1.1.0")
    assert sorted(current_registry(tmp_path)) == ["tinyseg:1.0.0", "tinyseg:1.1.0"]
    (tmp_path / "tinyseg" / "1.1.0" / "manifest.json").unlink()
    assert sorted(current_registry(tmp_path)) == ["tinyseg:1.0.0"]
