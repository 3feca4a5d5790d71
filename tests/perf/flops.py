"""Arithmetic of an ONNX graph: 2 × multiply–accumulates of its Conv, ConvTranspose, MatMul
and Gemm nodes for one input, from the tensor shapes onnxruntime actually produces.

Shape inference alone cannot see through data-dependent shapes (SegNet's un-pooling takes its
output size from a computed tensor), so every such node's input and output is made a graph
output and the model is run once, unoptimised, on the input shape of interest.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

_COUNTED = ("Conv", "ConvTranspose", "MatMul", "Gemm", "QLinearConv", "ConvInteger")


def graph_flops(onnx_path: Path, input_shape: tuple[int, ...]) -> dict[str, float]:
    """FLOPs for one run on an input of ``input_shape`` (batch included), per op type."""
    model = onnx.load(str(onnx_path))
    graph = model.graph
    weights = {i.name: numpy_helper.to_array(i).shape for i in graph.initializer}
    nodes = [n for n in graph.node if n.op_type in _COUNTED]
    have = {o.name for o in graph.output}
    wanted: list[str] = []
    for node in nodes:
        for name in (node.input[0], node.output[0]):
            if name and name not in have and name not in weights and name not in wanted:
                wanted.append(name)
    for name in wanted:
        graph.output.append(onnx.ValueInfoProto(name=name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed_name = sess.get_inputs()[0].name
    x = np.zeros(input_shape, np.float32)
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, {feed_name: x}), strict=True))
    shapes = {k: tuple(v.shape) for k, v in values.items()}
    totals: dict[str, float] = {}
    for node in nodes:
        op = node.op_type
        w = weights.get(node.input[1]) if len(node.input) > 1 else None
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            w_name = node.input[3] if op == "QLinearConv" else node.input[1]
            w = weights.get(w_name)
            out = shapes.get(node.output[0])
            if w is None or out is None:
                continue
            macs = math.prod(out) * math.prod(w[1:])  # (Cin / groups) × kh × kw per output
        elif op == "ConvTranspose":
            inp = shapes.get(node.input[0])
            if w is None or inp is None:
                continue
            macs = math.prod(inp) * w[1] * math.prod(w[2:])  # per input: (Cout / groups) × kh × kw
        else:  # MatMul / Gemm: (…, M, K) × (K, N)
            a = shapes.get(node.input[0])
            b = w or shapes.get(node.input[1])
            if a is None or b is None:
                continue
            macs = math.prod(a) * b[-1]
        totals[op] = totals.get(op, 0.0) + 2.0 * macs
    totals["total"] = sum(totals.values())
    return totals
