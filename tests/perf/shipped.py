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
    """The PyTorch module of a shipped model, with the weights of its ONNX file.

    Built from the exported graph (``models.training.export.module_from_onnx``), so a fresh
    checkout with no training checkpoint still has its PyTorch baseline, and the baseline is
    exactly the served release. None for other models, or when the training code no longer
    builds the architecture; ``bench_model`` also checks parity against the ONNX file.
    """
    name = model.manifest.name
    if name not in SHIPPED:
        return None
    from models.training.export import module_from_onnx

    arch = model.manifest.provenance.get("architecture", {})
    try:
        return module_from_onnx(
            name,
            model.onnx_path,
            int(arch["base_channels"]),
            int(arch.get("evidence_stride", 4)),
            int(arch.get("input_scale", 1)),
        )
    except (KeyError, ValueError, RuntimeError) as exc:
        print(f"   {name}: no PyTorch baseline ({exc})", flush=True)
        return None


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
