"""Inference helpers: run a session in batches and name its outputs by manifest role.

The session is passed in as a ``run`` callable, so this module stays free of onnxruntime and of
any process state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from app.registry.manifest import Manifest, OutputRole

FloatArray = NDArray[np.float32]
RunFn = Callable[[Sequence[str] | None, dict[str, FloatArray]], list[FloatArray]]


def run_batched(
    run: RunFn, manifest: Manifest, x: FloatArray, *, batch_size: int | None = None
) -> dict[OutputRole, FloatArray]:
    """Run ``x`` (N, C, H, W) through the model in batches; outputs keyed by role.

    Returns arrays concatenated along the batch axis, e.g. ``{LOGITS: (N, K, H, W)}`` for a
    segmentation model or ``{LOGITS: (N, K), CAM: (N, K, H, W)}`` for a CAM classifier.
    """
    input_name = manifest.inputs[0].name
    roles = [o for o in manifest.outputs if o.role is not None]
    names = [o.name for o in roles]
    size = batch_size or manifest.preprocessing.batch_size
    chunks: dict[OutputRole, list[FloatArray]] = {o.role: [] for o in roles if o.role}
    for start in range(0, x.shape[0], size):
        outputs = run(names, {input_name: np.ascontiguousarray(x[start : start + size])})
        for spec, value in zip(roles, outputs, strict=True):
            assert spec.role is not None
            chunks[spec.role].append(np.asarray(value, dtype=np.float32))
    return {role: np.concatenate(parts, axis=0) for role, parts in chunks.items()}
