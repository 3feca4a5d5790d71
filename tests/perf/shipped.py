"""Which models the benchmark runs: the shipped ones (with their PyTorch twins and INT8
versions) when present, otherwise the tiny fixture models so the harness still runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.registry.service import RegisteredModel, latest_versions, load_registry
from tests.perf.model_bench import ModelCase

SHIPPED = ("unet", "segnet", "classifier")
INT8_SUFFIX = "-int8"


def torch_twin(model: RegisteredModel) -> Any:
    """The PyTorch module with the training checkpoint's weights, exported graph's forward.

    None when the checkpoint is not on this machine, or when the training code no longer
    builds it (e.g. a checkpoint of another input layout, awaiting retraining): the PyTorch
    comparison is then skipped and the rest of the benchmark still runs. ``bench_model`` checks
    parity against the ONNX file, so a checkpoint that no longer matches the export shows up as
    a large ``parity`` difference rather than a silently wrong baseline.
    """
    name = model.manifest.name
    if name not in SHIPPED:
        return None
    from models.training.export import export_module, load_trained
    from models.training.train import CHECKPOINTS

    if not (CHECKPOINTS / f"{name}.pt").exists():
        return None
    try:
        net, _log = load_trained(name)
    except SystemExit as exc:  # the training code's "retrain it" message
        print(f"   {name}: no PyTorch baseline ({exc})", flush=True)
        return None
    return export_module(net, name)


def shipped_cases(models_dir: Path, names: tuple[str, ...] = SHIPPED) -> list[ModelCase]:
    """The served release of each shipped model under ``models_dir`` (the newest), with its
    INT8 build if present."""
    registry = load_registry(models_dir)
    latest = latest_versions(registry)
    cases = []
    for name in names:
        fp32 = latest.get(name)
        if fp32 is None or not fp32.onnx_path.exists():
            continue
        int8 = registry.get(fp32.manifest.key + INT8_SUFFIX)
        cases.append(ModelCase(model=fp32, int8=int8, torch_loader=torch_twin))
    return cases


def fixture_cases(models_dir: Path) -> list[ModelCase]:
    """Every model under ``models_dir`` (the tiny fixtures), without PyTorch twins."""
    return [
        ModelCase(model=m)
        for m in sorted(load_registry(models_dir).values(), key=lambda m: m.manifest.key)
    ]
