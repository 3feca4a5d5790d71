"""Model-only bound: onnxruntime (fp32, INT8) and PyTorch eager on the same preprocessed tensors.

Sessions are built with the workers' options (``workers/onnx_sessions.py``: ENABLE_ALL graph
optimisation, sequential execution, one inter-op thread) at the intra-op thread counts the
deployments use. Every variant of one model and batch size is timed interleaved in this
process, so the ratios come from the same moments of machine load.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.registry.manifest import OutputRole, Task
from app.registry.service import RegisteredModel
from tests.perf.flops import graph_flops
from tests.perf.timing import interleaved
from workers.onnx_sessions import session_options
from workers.pipeline.preprocess import preprocess_frames

TorchLoader = Callable[[RegisteredModel], Any]  # returns an eval() torch module, or None


def make_session(path: Path, threads: int) -> ort.InferenceSession:
    """An InferenceSession with the options the workers use."""
    return ort.InferenceSession(
        str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
    )


@dataclass
class ModelCase:
    """One shipped model, its optional INT8 version and a PyTorch twin with the same weights."""

    model: RegisteredModel
    int8: RegisteredModel | None = None
    torch_loader: TorchLoader | None = None

    @property
    def name(self) -> str:
        return self.model.manifest.name


@dataclass
class ModelResult:
    """Everything measured for one model (JSON-ready via ``to_json``)."""

    name: str
    gflop_per_image: float
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (batch, variant)
    parity: dict[str, float] = field(default_factory=dict)
    int8_agreement: dict[str, float] = field(default_factory=dict)
    ms_per_image: dict[str, float] = field(default_factory=dict)  # variant@batch -> ms

    def to_json(self) -> dict[str, Any]:
        return {
            "gflop_per_image": self.gflop_per_image,
            "rows": self.rows,
            "parity": self.parity,
            "int8_agreement": self.int8_agreement,
            "ms_per_image": self.ms_per_image,
        }


def model_input(model: RegisteredModel, frames_hu: np.ndarray) -> np.ndarray:
    """The network input of ``model`` for (F, H, W) float32 frames in HU: (F, 1, h, w)."""
    return preprocess_frames(frames_hu.astype(np.float32), model.manifest.preprocessing)


def _input_name(model: RegisteredModel) -> str:
    return model.manifest.inputs[0].name


def _logits_index(model: RegisteredModel) -> int:
    return next(i for i, o in enumerate(model.manifest.outputs) if o.role is OutputRole.LOGITS)


def _dice_per_label(a: np.ndarray, b: np.ndarray, labels: list[int]) -> dict[str, float]:
    """Pooled Dice of two label maps for each label (1.0 when both are empty)."""
    out = {}
    for v in labels:
        x, y = a == v, b == v
        denom = int(x.sum()) + int(y.sum())
        out[str(v)] = 1.0 if denom == 0 else 2.0 * int((x & y).sum()) / denom
    return out


def _agreement(
    model: RegisteredModel, ref: list[np.ndarray], got: list[np.ndarray]
) -> dict[str, float]:
    """How far the INT8 outputs are from fp32: mask Dice (segmentation) or logit drift."""
    k = _logits_index(model)
    out: dict[str, float] = {"max_abs_logit_diff": float(np.abs(ref[k] - got[k]).max())}
    if model.manifest.task is Task.SEGMENTATION:
        labels = [lab.value for lab in model.manifest.labels if lab.value != 0]
        dice = _dice_per_label(ref[k].argmax(1), got[k].argmax(1), labels)
        out.update({f"dice_label_{v}": d for v, d in dice.items()})
        out["mask_dice_mean"] = float(np.mean(list(dice.values())))
        out["mask_dice_min"] = float(min(dice.values()))
    return out


def bench_model(
    case: ModelCase,
    x: np.ndarray,
    *,
    threads: list[int],
    batches: list[int],
    rounds: int,
    block_s: float,
    peak_gflops: dict[int, float],
) -> ModelResult:
    """Time ORT fp32 / INT8 and PyTorch eager on ``x`` (N, C, H, W) at each thread count."""
    model = case.model
    name_in = _input_name(model)
    flops = graph_flops(model.onnx_path, (1, *x.shape[1:]))["total"]
    result = ModelResult(name=model.manifest.key, gflop_per_image=flops / 1e9)
    sessions = {f"ort_fp32_{t}t": make_session(model.onnx_path, t) for t in threads}
    if case.int8 is not None:
        sessions.update({f"ort_int8_{t}t": make_session(case.int8.onnx_path, t) for t in threads})
    matmuls = {t: matmul_runner(t) for t in threads}
    net = case.torch_loader(model) if case.torch_loader else None
    torch = None
    if net is not None:
        import torch as _torch

        torch = _torch
    # parity and INT8 agreement on every available slice, before timing
    ref = make_session(model.onnx_path, max(threads))
    ref_out = [
        np.concatenate(o)
        for o in zip(
            *[ref.run(None, {name_in: x[i : i + 8]}) for i in range(0, len(x), 8)], strict=True
        )
    ]
    if torch is not None:
        with torch.inference_mode():
            t_out = net(torch.from_numpy(x[: min(len(x), 8)]))
        t_out = t_out if isinstance(t_out, tuple) else (t_out,)
        for o, spec, r in zip(t_out, model.manifest.outputs, ref_out, strict=False):
            result.parity[spec.name] = float(np.abs(o.numpy() - r[: len(o)]).max())
    if case.int8 is not None:
        q = sessions[f"ort_int8_{max(threads)}t"]
        q_out = [
            np.concatenate(o)
            for o in zip(
                *[q.run(None, {name_in: x[i : i + 8]}) for i in range(0, len(x), 8)], strict=True
            )
        ]
        result.int8_agreement = _agreement(model, ref_out, q_out)
    for batch in batches:
        xb = (
            np.ascontiguousarray(x[:batch])
            if len(x) >= batch
            else np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
        )
        fns: dict[str, Callable[[], object]] = {
            k: (lambda s=s, xb=xb: s.run(None, {name_in: xb})) for k, s in sessions.items()
        }
        if torch is not None:
            xt = torch.from_numpy(xb)

            def torch_run(t: int, xt: Any = xt) -> Callable[[], object]:
                def call() -> object:
                    torch.set_num_threads(t)
                    with torch.inference_mode():
                        return net(xt)

                return call

            fns.update({f"torch_fp32_{t}t": torch_run(t) for t in threads})
        # the practical peak, timed in the same rounds: a large fp32 MatMul in onnxruntime
        fns.update({f"peak_matmul_{t}t": (lambda m=m: m()) for t, m in matmuls.items()})
        refs = [f"ort_fp32_{t}t" for t in threads]
        stats = interleaved(fns, rounds=rounds, block_s=block_s, refs=refs)
        for variant, st in stats.items():
            if variant.startswith("peak_matmul_"):
                continue
            t = int(variant.rsplit("_", 1)[1][:-1])
            ms_img = st.median_ms / batch
            gflops = flops * batch / (st.median_ms / 1e3) / 1e9
            mm = stats[f"peak_matmul_{t}t"]
            # per round: achieved GFLOP/s / the MatMul's GFLOP/s in the same round
            fraction = statistics.median(
                (flops * batch / a) / (MATMUL_FLOPS / b)
                for a, b in zip(st.rounds_ms, mm.rounds_ms, strict=True)
            )
            row = {
                "batch": batch,
                "variant": variant,
                "threads": t,
                "median_ms": st.median_ms,
                "p10_ms": st.p10_ms,
                "ms_per_image": ms_img,
                "gflops": gflops,
                "peak_fraction": fraction,
                "matmul_gflops": MATMUL_FLOPS / (mm.median_ms / 1e3) / 1e9,
                "fma_peak_fraction": gflops / peak_gflops[t] if peak_gflops.get(t) else None,
                "vs_ort_fp32": st.ratios.get(f"ort_fp32_{t}t"),
                "n": st.n,
            }
            result.rows.append(row)
            result.ms_per_image[f"{variant}@{batch}"] = ms_img
    return result


MATMUL_N = 1024
MATMUL_FLOPS = 2.0 * MATMUL_N**3


def matmul_runner(threads: int) -> Callable[[], object]:
    """A zero-argument call of a 1024³ fp32 MatMul in onnxruntime at ``threads`` threads."""
    import onnx
    from onnx import TensorProto, helper

    n = MATMUL_N
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(
        onnx.shape_inference.infer_shapes(model).SerializeToString(),
        session_options(threads),  # as the model sessions it is the reference for
        providers=["CPUExecutionProvider"],
    )
    rng = np.random.default_rng(0)
    feed = {"a": rng.random((n, n), dtype=np.float32), "b": rng.random((n, n), dtype=np.float32)}
    return lambda: sess.run(None, feed)


def _throughput_worker(
    path: str, threads: int, x: np.ndarray, name_in: str, seconds: float, barrier: Any, q: Any
) -> None:
    sess = make_session(Path(path), threads)
    for _ in range(2):
        sess.run(None, {name_in: x})
    barrier.wait()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, {name_in: x})
        n += len(x)
    q.put(n / (time.perf_counter() - t0))


def multiprocess_throughput(
    model: RegisteredModel, x: np.ndarray, *, processes: int, threads: int, seconds: float
) -> float:
    """Images/s of ``processes`` concurrent processes × ``threads`` threads, summed."""
    ctx = mp.get_context("spawn")
    q, barrier = ctx.Queue(), ctx.Barrier(processes)
    args = (
        str(model.onnx_path),
        threads,
        np.ascontiguousarray(x),
        _input_name(model),
        seconds,
        barrier,
        q,
    )
    procs = [ctx.Process(target=_throughput_worker, args=args) for _ in range(processes)]
    for p in procs:
        p.start()
    rates = [q.get(timeout=seconds * 10 + 120) for _ in procs]
    for p in procs:
        p.join()
    return float(sum(rates))


def cores() -> int:
    """CPU cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


class JobReplay:
    """Replays a job's forward passes on this process's own sessions: the model-only time of
    that job, measured right after it so both see the same machine load."""

    def __init__(self, cases: list[ModelCase], inputs: dict[str, np.ndarray]) -> None:
        self.cases = cases
        self.inputs = inputs
        self._sessions: dict[tuple[str, int], ort.InferenceSession] = {}

    def seconds(self, threads: int, slices: int, passes: dict[str, int]) -> dict[str, float]:
        """Per model and in total: time to run ``slices`` + its saliency passes, batched as the
        worker batches them (the manifest's batch size)."""
        out: dict[str, float] = {}
        for case in self.cases:
            m = case.model.manifest
            key = (m.key, threads)
            if key not in self._sessions:
                self._sessions[key] = make_session(case.model.onnx_path, threads)
            sess = self._sessions[key]
            x = self.inputs[m.key]
            b = m.preprocessing.batch_size
            batch = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))
            # warm at the full batch (a fresh session's first batch of 8 grows its arena)
            sess.run(None, {_input_name(case.model): batch})
            # a segmenter with test-time augmentation runs every slice once per member
            infer = slices * m.passes_per_frame
            for stage, n in (("infer", infer), ("saliency", passes.get(m.name, 0))):
                t0 = time.perf_counter()
                for start in range(0, n, b):
                    sess.run(None, {_input_name(case.model): batch[: min(b, n - start)]})
                out[f"{stage}:{m.name}"] = time.perf_counter() - t0
        out["total"] = sum(out.values())
        return out
