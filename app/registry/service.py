"""The model registry: manifests found under ``models_dir/<name>/<version>/``.

The API lists and resolves models from manifests alone (it never loads ONNX); the worker also
verifies the sha256 of the ONNX file before creating a session.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.errors import UnknownModel
from app.registry.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisteredModel:
    """A manifest and the folder it was found in."""

    manifest: Manifest
    folder: Path

    @property
    def onnx_path(self) -> Path:
        """The ONNX file named by the manifest."""
        return self.folder / self.manifest.file


def _version_key(version: str) -> tuple[Any, ...]:
    """Sort key of a version: a plain release (``1.1.0``) ranks above any version with a
    suffix (``1.9.0-rc1``, ``1.1.0-int8``), then Semantic Versioning 2.0 precedence (§11).

    So a variant such as an INT8 build, or a release candidate, is never the version that a
    bare model name resolves to while a plain release exists. Build metadata (``+...``) is
    ignored.
    """
    release, _, suffix = version.split("+", 1)[0].partition("-")

    def parts(text: str) -> tuple[tuple[int, str], ...]:
        return tuple((int(p), "") if p.isdigit() else (-1, p) for p in text.split(".") if p)

    return (not suffix, parts(release), parts(suffix))


def load_registry(models_dir: Path) -> dict[str, RegisteredModel]:
    """Every valid manifest under ``models_dir``, keyed by ``name:version``.

    Invalid manifests are skipped with a warning naming the file (``medcad models verify`` reports
    them as errors).
    """
    found: dict[str, RegisteredModel] = {}
    for path in sorted(models_dir.glob("*/*/manifest.json")):
        try:
            manifest = Manifest.model_validate(json.loads(path.read_text()))
        except (ValidationError, json.JSONDecodeError, OSError) as exc:
            log.warning("invalid manifest skipped: %s (%s)", path, type(exc).__name__)
            continue
        found[manifest.key] = RegisteredModel(manifest=manifest, folder=path.parent)
    return found


_cache: dict[Path, tuple[tuple[tuple[str, int, int], ...], dict[str, RegisteredModel]]] = {}
_cache_lock = threading.Lock()


def current_registry(models_dir: Path) -> dict[str, RegisteredModel]:
    """``load_registry``, re-read only when a manifest was added, removed or changed.

    The API resolves models on every upload; parsing and validating every manifest each time
    cost about 3 % of an upload's time. A listing and a stat per manifest tell whether
    anything changed (name, modification time, size), so new versions still appear without a
    restart. Returns a new dict each call; the models in it are shared and immutable.
    """
    paths = sorted(models_dir.glob("*/*/manifest.json"))
    signature = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        signature.append((str(path), st.st_mtime_ns, st.st_size))
    key = models_dir.resolve()
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None and cached[0] == tuple(signature):
            return dict(cached[1])
    registry = load_registry(models_dir)
    with _cache_lock:
        _cache[key] = (tuple(signature), registry)
    return dict(registry)


def file_sha256(path: Path) -> str:
    """Streamed sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_model(model: RegisteredModel) -> str | None:
    """None when the ONNX file exists and matches the manifest sha256, else the problem."""
    if not model.onnx_path.is_file():
        return f"{model.manifest.key}: missing {model.manifest.file}"
    actual = file_sha256(model.onnx_path)
    if actual != model.manifest.sha256:
        return (
            f"{model.manifest.key}: sha256 {actual} does not match manifest {model.manifest.sha256}"
        )
    return None


def latest_versions(
    registry: dict[str, RegisteredModel], *, defaults_only: bool = False
) -> dict[str, RegisteredModel]:
    """The newest version of each model name (plain releases first, see ``_version_key``);
    with ``defaults_only``, the newest of the versions whose manifest says ``default``."""
    best: dict[str, RegisteredModel] = {}
    for model in registry.values():
        if defaults_only and not model.manifest.default:
            continue
        name = model.manifest.name
        current = best.get(name)
        if current is None or _version_key(model.manifest.version) > _version_key(
            current.manifest.version
        ):
            best[name] = model
    return best


def resolve_models(
    registry: dict[str, RegisteredModel], requested: list[str] | None
) -> list[RegisteredModel]:
    """Turn ``["unet", "segnet:1.0.0"]`` (or None: per model, its newest default version)
    into registered models; a bare name is its newest version.

    Raises ``UnknownModel`` naming the first name that is not registered.
    """
    if not requested:
        chosen = list(latest_versions(registry, defaults_only=True).values())
        if not chosen:
            raise UnknownModel(detail="no default model is registered")
        return sorted(chosen, key=lambda m: m.manifest.name)
    latest = latest_versions(registry)
    result: dict[str, RegisteredModel] = {}
    for item in requested:
        name = item.strip()
        if not name:
            continue
        model = registry.get(name) if ":" in name else latest.get(name)
        if model is None:
            known = ", ".join(sorted(registry)) or "none"
            raise UnknownModel(detail=f"model {name[:80]!r} is not registered (known: {known})")
        result[model.manifest.key] = model
    if not result:
        raise UnknownModel(detail="no model named")
    return [result[k] for k in sorted(result)]
