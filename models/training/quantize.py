"""Static INT8 versions of the shipped models: ``models/<name>/<release>-int8``.

    python -m models.training.quantize [unet segnet classifier] [--calibration 64]
        [--eval-slices 1024] [--threads 1]

For each model: ``quant_pre_process`` (shape inference, BatchNorm folded into the
convolutions), then ``quantize_static`` in QDQ format — per-channel symmetric INT8 weights,
per-tensor asymmetric UINT8 activations, MinMax ranges observed on phantom calibration
slices from the validation split (never the test split). onnxruntime fuses each
DequantizeLinear → Conv → QuantizeLinear group into an integer convolution at load time.

Kept in fp32, because quantising them costs accuracy and buys no speed:

* the classifier's CAM head — every node that feeds only the ``cam`` output (the bilinear
  up-sampling of the evidence map): the map is displayed at full resolution, so its values
  must keep fp32 resolution, and the logit (``mean(cam) + bias``) must not move;
* the classifier's evidence projection (``1 × 1`` conv and its scale), which carries the
  decision: a rounding error there shifts every slice's logit alike;
* the final ``1 × 1``/``3 × 3`` class projection of the segmentation networks (a few
  channels: no speed to gain, and argmax ties are decided there);
* every convolution at the input's full resolution (the first encoder block, the last
  decoder block): these layers are narrow and memory-bound, so INT8 gains little there,
  and they draw the boundaries of structures a few pixels wide. Measured on the U-Net
  (128 held-out slices, 96 with nodules): quantising them too drops the nodule mask Dice
  against fp32 from 0.99 to 0.81 (lung 0.999 → 0.990).

The INT8 model is checked against fp32 on held-out test slices (mask Dice per label,
classifier AUC and its drop, logit drift) and timed against fp32 on the same tensors
(interleaved rounds, 1 thread and all cores). Those numbers go into its manifest
(``default: false``: users ask for it with ``models=unet:1.1.0-int8``) and its card. A
version that fails the release gates (mask Dice against fp32 ≥ 0.99, classifier AUC drop
≤ 0.005) is not served: it is moved to ``models/.cache/int8-rejected/`` for inspection.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from app.registry.manifest import Manifest, OutputRole, Task
from models.training.card import render_card, write_manifest
from models.training.data import CACHE_DIR, MODELS_DIR, SPLITS, load_split, network_inputs
from models.training.evaluate import release_dir
from models.training.export import sha256_file, strip_doc_strings
from workers.onnx_sessions import session_options
from workers.pipeline.postprocess import calibrated_probabilities

INT8_SUFFIX = "-int8"  # the INT8 build of release X is version X-int8 (never a default)
MODEL_NAMES = ("unet", "segnet", "classifier")
DICE_GATE = 0.99  # mask agreement with fp32 required to ship
AUC_DROP_GATE = 0.005


class SliceReader(CalibrationDataReader):  # type: ignore[misc]
    """Feeds calibration slices one batch at a time."""

    def __init__(self, input_name: str, x: NDArray[np.float32], batch: int = 8) -> None:
        self.batches = iter([{input_name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, NDArray[np.float32]] | None:
        return next(self.batches, None)


def calibration_slices(n: int, seed: int = 0) -> NDArray[np.float32]:
    """``n`` validation inputs (N, C, 256, 256), half of them showing a nodule when possible."""
    val = load_split("val")
    rng = np.random.default_rng(seed)
    nodule = np.flatnonzero((val.y == 2).any(axis=(1, 2)))
    other = np.setdiff1d(np.arange(len(val.x)), nodule)
    k = min(len(nodule), n // 2)
    pick = np.concatenate(
        [rng.choice(nodule, k, replace=False), rng.choice(other, n - k, replace=False)]
    )
    return network_inputs(val, np.sort(pick))


def _ancestors(graph: onnx.GraphProto, tensor: str) -> set[str]:
    """Names of the nodes that ``tensor`` depends on."""
    producer = {o: n for n in graph.node for o in n.output}
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in seen:
            seen.add(node.name)
            stack.extend(node.input)
    return seen


def full_resolution_convs(model: onnx.ModelProto, manifest: Manifest) -> list[str]:
    """Convolutions whose output has the input's full height and width.

    Shapes come from one unoptimised onnxruntime run (SegNet's un-pooling sizes are computed
    in the graph, so static shape inference cannot see through it).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    convs = [n for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    have = {o.name for o in m.graph.output}
    for n in convs:
        if n.output[0] not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n.output[0]))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    h, w = manifest.preprocessing.size
    names = [o.name for o in sess.get_outputs()]
    x = np.zeros((1, manifest.preprocessing.channels, h, w), np.float32)
    shapes = {
        k: v.shape
        for k, v in zip(names, sess.run(names, {sess.get_inputs()[0].name: x}), strict=True)
    }
    return [n.name for n in convs if tuple(shapes[n.output[0]][-2:]) == (h, w)]


def fp32_nodes(model: onnx.ModelProto, manifest: Manifest) -> list[str]:
    """Nodes to keep in fp32 (see the module docstring)."""
    graph = model.graph
    logits = next(o.name for o in manifest.outputs if o.role is OutputRole.LOGITS)
    keep: set[str] = set(full_resolution_convs(model, manifest))
    cam = manifest.output(OutputRole.CAM)
    if cam is not None:
        keep |= _ancestors(graph, cam.name) - _ancestors(graph, logits)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    # the last convolution on the way to the logits is the class / evidence projection
    on_path = _ancestors(graph, logits)
    last = [n for n in convs if n.name in on_path][-1:]
    keep |= {n.name for n in last}
    if cam is not None and last:
        # and everything between it and the outputs (scale, pooling, bias)
        keep |= _descendants(graph, last[0].output[0])
    return sorted(keep)


def _descendants(graph: onnx.GraphProto, tensor: str) -> set[str]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        for node in consumers.get(stack.pop(), []):
            if node.name not in seen:
                seen.add(node.name)
                stack.extend(node.output)
    return seen


def quantize(
    fp32_path: Path, manifest: Manifest, out_path: Path, calib: NDArray[np.float32]
) -> dict[str, Any]:
    """Write the QDQ INT8 model; returns what was done (for the provenance)."""
    with tempfile.TemporaryDirectory(prefix="medcad-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        for i, node in enumerate(model.graph.node):  # exclusion works by node name
            if not node.name:
                node.name = f"{node.op_type}_{i}"
        onnx.save(model, str(pre))
        excluded = fp32_nodes(model, manifest)
        options = {"ActivationSymmetric": False, "WeightSymmetric": True}
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            quantize_static(
                str(pre),
                str(out_path),
                SliceReader(manifest.inputs[0].name, calib),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=excluded,
                extra_options=options,
            )
    strip_doc_strings(out_path)
    ops: dict[str, int] = {}
    for n in onnx.load(str(out_path)).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {
        "tool": f"onnxruntime.quantization.quantize_static (onnxruntime {ort.__version__})",
        "format": "QDQ",
        "weights": "int8, symmetric, per output channel",
        "activations": "uint8, asymmetric, per tensor",
        "calibration": {
            "method": "MinMax",
            "slices": len(calib),
            "source": "validation split phantoms (half with a nodule), never the test split",
        },
        "pre_process": "onnxruntime.quantization.quant_pre_process (BatchNorm folded)",
        "kept_fp32": excluded,
        "graph_ops": dict(sorted(ops.items())),
    }


def session(path: Path, threads: int) -> ort.InferenceSession:
    """Sessions as the workers build them."""
    return ort.InferenceSession(
        str(path), session_options(threads), providers=["CPUExecutionProvider"]
    )


def run_all(
    sess: ort.InferenceSession, x: NDArray[np.float32], batch: int = 8
) -> list[NDArray[np.float32]]:
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i : i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def auc(score: NDArray[np.float64], label: NDArray[np.bool_]) -> float:
    """Area under the ROC curve (Mann–Whitney U with mid-ranks for ties)."""
    from scipy.stats import rankdata

    n1, n0 = int(label.sum()), int((~label).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[label].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom


def agreement(
    manifest: Manifest,
    ref: list[NDArray[np.float32]],
    got: list[NDArray[np.float32]],
    y: NDArray[np.uint8],
) -> dict[str, Any]:
    """INT8 vs fp32 on the held-out slices (and both vs ground truth)."""
    k = next(i for i, o in enumerate(manifest.outputs) if o.role is OutputRole.LOGITS)
    out: dict[str, Any] = {"max_abs_logit_diff": float(np.abs(ref[k] - got[k]).max())}
    if manifest.task is Task.SEGMENTATION:
        a, b = ref[k].argmax(1), got[k].argmax(1)
        per_label = {}
        for lab in manifest.labels:
            if lab.value == 0:
                continue
            per_slice = [
                dice(a[i] == lab.value, b[i] == lab.value)
                for i in range(len(a))
                if (a[i] == lab.value).any() or (b[i] == lab.value).any()
            ]
            per_label[lab.name] = {
                "dice_vs_fp32": dice(a == lab.value, b == lab.value),
                "worst_slice_dice_vs_fp32": min(per_slice) if per_slice else 1.0,
                "fp32_dice_vs_truth": dice(a == lab.value, y == lab.value),
                "int8_dice_vs_truth": dice(b == lab.value, y == lab.value),
            }
        out["labels"] = per_label
        out["mask_dice_vs_fp32"] = float(np.mean([v["dice_vs_fp32"] for v in per_label.values()]))
        out["pixels_agree"] = float((a == b).mean())
    else:
        truth = (y == 2).any(axis=(1, 2))
        s_ref, s_got = ref[k].reshape(len(y), -1)[:, -1], got[k].reshape(len(y), -1)[:, -1]
        out["auc_fp32"] = auc(s_ref.astype(np.float64), truth)
        out["auc_int8"] = auc(s_got.astype(np.float64), truth)
        out["auc_drop"] = out["auc_fp32"] - out["auc_int8"]
        assert manifest.classification is not None
        c = manifest.classification
        p_ref = calibrated_probabilities(s_ref, c.temperature, c.bias)
        p_got = calibrated_probabilities(s_got, c.temperature, c.bias)
        out["max_abs_probability_diff"] = float(np.abs(p_ref - p_got).max())
        out["decision_agreement"] = float(((p_ref >= c.threshold) == (p_got >= c.threshold)).mean())
        cam = manifest.output(OutputRole.CAM)
        if cam is not None:
            j = manifest.outputs.index(cam)
            out["cam_max_abs_diff"] = float(np.abs(ref[j] - got[j]).max())
            out["cam_max_abs_fp32"] = float(np.abs(ref[j]).max())
    out["slices"] = len(y)
    return out


def speed(
    fp32: Path, int8: Path, x: NDArray[np.float32], threads: list[int], rounds: int = 5
) -> dict[str, Any]:
    """Median per-round time ratio fp32 / INT8 (interleaved), per thread count."""
    out: dict[str, Any] = {}
    for t in threads:
        s32, s8 = session(fp32, t), session(int8, t)
        name = s32.get_inputs()[0].name
        per_round: list[tuple[float, float]] = []
        for s in (s32, s8):
            s.run(None, {name: x})
        for r in range(rounds):
            pair = []
            for s in (s32, s8) if r % 2 == 0 else (s8, s32):
                s.run(None, {name: x})
                ts = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    s.run(None, {name: x})
                    ts.append(time.perf_counter() - t0)
                pair.append((s is s32, statistics.median(ts)))
            d = dict(pair)
            per_round.append((d[True], d[False]))
        out[f"{t}_thread"] = {
            "batch": len(x),
            "fp32_ms_per_slice": 1e3 * statistics.median(a for a, _ in per_round) / len(x),
            "int8_ms_per_slice": 1e3 * statistics.median(b for _, b in per_round) / len(x),
            "speedup": statistics.median(a / b for a, b in per_round),
            "load_average": os.getloadavg()[0],
        }
    return out


def int8_manifest(
    source: Manifest, sha: str, provenance: dict[str, Any], metrics: dict[str, Any]
) -> Manifest:
    data = source.model_dump(mode="json")
    data.update(
        version=source.version + INT8_SUFFIX,
        sha256=sha,
        default=False,
        description="INT8 (static, per-channel QDQ) version of "
        f"{source.key}: same preprocessing, labels and thresholds; the speed-up depends on the "
        "CPU's 8-bit dot-product instructions (see the card). " + source.description,
        provenance=provenance,
        metrics=metrics,
    )
    return Manifest.model_validate(data)


def int8_card(manifest: Manifest, q: dict[str, Any]) -> str:
    text = render_card(manifest)
    lines = [
        "",
        "## INT8 quantisation",
        "",
        f"- Source: `{q['source']['key']}` (sha256 `{q['source']['sha256']}`).",
        f"- {q['format']} via {q['tool']}: weights {q['weights']}; activations {q['activations']}.",
        f"- Calibration: {q['calibration']['method']} on {q['calibration']['slices']} "
        f"{q['calibration']['source']}.",
        f"- Kept in fp32: {', '.join(q['kept_fp32']) or 'nothing'}.",
        f"- Agreement with fp32 on {q['agreement']['slices']} held-out test slices: "
        + json.dumps({k: v for k, v in q["agreement"].items() if k != "slices"}),
        "- Speed vs fp32 (same tensors, interleaved rounds, this build machine): "
        + json.dumps(q["speed"]),
        f"- Release gates: mask Dice vs fp32 ≥ {DICE_GATE}, AUC drop ≤ {AUC_DROP_GATE}: "
        f"{'passed' if q['gates_passed'] else 'NOT passed'}.",
        "",
    ]
    return text + "\n".join(lines)


def build(
    name: str,
    *,
    calibration: int,
    eval_slices: int,
    threads: list[int],
    models_dir: Path,
    keep_failed: bool = False,
) -> dict[str, Any]:
    src_dir = release_dir(name, models_dir)
    source = Manifest.model_validate_json((src_dir / "manifest.json").read_text())
    fp32 = src_dir / source.file
    int8_version = source.version + INT8_SUFFIX
    out_dir = models_dir / name / int8_version
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    t0 = time.time()
    q = quantize(fp32, source, out, calibration_slices(calibration))
    q["seconds"] = round(time.time() - t0, 1)
    q["source"] = {"key": source.key, "sha256": source.sha256}
    test = load_split("test")
    x = network_inputs(test, np.arange(min(eval_slices, len(test.x))))
    y = test.y[:eval_slices]
    ref = run_all(session(fp32, max(threads)), x)
    got = run_all(session(out, max(threads)), x)
    q["agreement"] = agreement(source, ref, got, y)
    q["speed"] = speed(
        fp32, out, np.ascontiguousarray(x[: source.preprocessing.batch_size]), threads
    )
    a = q["agreement"]
    q["gates_passed"] = bool(
        a.get("mask_dice_vs_fp32", 1.0) >= DICE_GATE and a.get("auc_drop", 0.0) <= AUC_DROP_GATE
    )
    n_series = SPLITS["test"]["slices"]
    metrics: dict[str, Any] = {
        "test_series": int(np.ceil(eval_slices / int(n_series)))
        if isinstance(n_series, int)
        else None,
        "test_slices": len(y),
        "int8_vs_fp32": a,
        "speedup_vs_fp32": {k: v["speedup"] for k, v in q["speed"].items()},
    }
    if "mask_dice_vs_fp32" in a:
        metrics["mask_dice_vs_fp32"] = {"value": a["mask_dice_vs_fp32"]}
    if "auc_int8" in a:
        metrics["auc"] = {"value": a["auc_int8"]}
        metrics["auc_drop_vs_fp32"] = {"value": a["auc_drop"]}
    provenance = dict(source.provenance)
    provenance["quantization"] = q
    provenance["commands"] = dict(
        source.provenance.get("commands", {}),
        quantize=f"python -m models.training.quantize {name}",
        evaluate=f"python -m models.training.quantize {name}",
    )
    provenance["export"] = dict(source.provenance.get("export", {}), bytes=out.stat().st_size)
    provenance["versions"] = dict(
        source.provenance.get("versions", {}),
        onnxruntime=ort.__version__,
        python=platform.python_version(),
    )
    manifest = int8_manifest(source, sha256_file(out), provenance, metrics)
    write_manifest(manifest, out_dir)
    (out_dir / "card.md").write_text(int8_card(manifest, q))
    size_mib = out.stat().st_size / 2**20
    if not q["gates_passed"] and not keep_failed:
        # a version that fails its release gates is not served: keep it for inspection only
        rejected = CACHE_DIR / "int8-rejected" / name / int8_version
        shutil.rmtree(rejected, ignore_errors=True)
        rejected.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out_dir), str(rejected))
        q["rejected_to"] = str(rejected.relative_to(MODELS_DIR))
    print(
        f"{manifest.key}: {size_mib:.2f} MiB, agreement "
        f"{json.dumps({k: v for k, v in a.items() if not isinstance(v, dict)})}, speed "
        f"{json.dumps(metrics['speedup_vs_fp32'])}, gates {'passed' if q['gates_passed'] else 'NOT passed'}",
        flush=True,
    )
    return q


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write static INT8 versions of the shipped models.")
    p.add_argument("models", nargs="*", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    p.add_argument("--calibration", type=int, default=64, help="calibration slices")
    p.add_argument("--eval-slices", type=int, default=1024, help="held-out test slices")
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    p.add_argument(
        "--keep-failed",
        action="store_true",
        help="leave a version that fails the release gates in the models folder",
    )
    args = p.parse_args(argv)
    failed = []
    for name in args.models:
        q = build(
            name,
            calibration=args.calibration,
            eval_slices=args.eval_slices,
            threads=sorted(set(args.threads)),
            models_dir=args.models_dir,
            keep_failed=args.keep_failed,
        )
        if not q["gates_passed"]:
            failed.append(name)
    if failed:
        print(
            f"release gates not passed (not served, kept under models/.cache/int8-rejected): "
            f"{', '.join(failed)}",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
