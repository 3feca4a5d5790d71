"""The `medcad` command: models list/verify, keys lifecycle, demo-data, db migrations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom


def _medcad(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, text=True,
                          capture_output=True, check=check, timeout=300)


def _env(tmp_path: Path, models_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDCAD_")}
    env.update(MEDCAD_DATA_DIR=str(tmp_path / "data"), MEDCAD_MODELS_DIR=str(models_dir),
               COLUMNS="200")
    return env


def test_models_list_and_verify_detects_tampering(tmp_path: Path, tiny_models_dir: Path) -> None:
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    env = _env(tmp_path, models)
    listing = _medcad("models", "list", env=env).stdout
    assert "tinyseg" in listing and "tinycls" in listing
    assert _medcad("models", "verify", env=env).returncode == 0
    onnx_file = next(models.glob("tinyseg/*/model.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    result = _medcad("models", "verify", env=env, check=False)
    assert result.returncode == 1 and "does not match" in result.stdout


def test_keys_lifecycle(tmp_path: Path, tiny_models_dir: Path) -> None:
    env = _env(tmp_path, tiny_models_dir)
    token = _medcad("keys", "create", "--role", "viewer", "--name", "reader", env=env).stdout.strip()
    assert token.startswith("mc_")
    prefix = token.split("_")[1]
    listing = _medcad("keys", "list", env=env).stdout
    assert prefix in listing and "viewer" in listing and token not in listing
    assert f"revoked {prefix}" in _medcad("keys", "revoke", prefix, env=env).stdout
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'medcad.sqlite3'}")
    with engine.connect() as conn:
        row = conn.execute(text("SELECT key_hash, revoked_at FROM api_keys")).one()
    engine.dispose()
    assert row[0] != token and len(row[0]) == 64 and row[1] is not None  # only the hash is stored


def test_demo_data_writes_readable_ct_series(tmp_path: Path, tiny_models_dir: Path) -> None:
    env = _env(tmp_path, tiny_models_dir)
    out = tmp_path / "demo"
    folders = _medcad("demo-data", str(out), "--n", "1", "--seed", "3", env=env).stdout.split()
    files = sorted(Path(folders[0]).glob("*.dcm"))
    assert len(files) >= 10
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert (Path(folders[0]) / "labels.npy").exists()


def test_db_upgrade_downgrade(tmp_path: Path, tiny_models_dir: Path) -> None:
    env = _env(tmp_path, tiny_models_dir)
    (tmp_path / "data").mkdir()
    _medcad("db", "upgrade", env=env)
    _medcad("db", "downgrade", env=env)
    _medcad("db", "upgrade", env=env)
