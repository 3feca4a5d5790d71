"""The CPU's fp32 arithmetic peak, measured three ways.

* ``fma``: a C kernel of 12 independent FMA chains on the widest vectors the CPU has
  (AVX-512 or AVX2), one process per core, best of several runs: the practical FMA ceiling.
* ``ort_matmul``: a 2048³ fp32 MatMul through onnxruntime (MLAS, the library that runs the
  convolutions), at the thread count under test: what a well-blocked kernel reaches.
* ``numpy_matmul``: the same product through numpy's BLAS. Reported for reference only: the
  OpenBLAS wheel may pick an AVX2 kernel on CPUs it does not know, i.e. half the FMA width.

The peak that fractions are taken against is the largest of the three, so a fraction never
flatters the code under test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

_FMA_C = r"""
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#ifdef __AVX512F__
typedef __m512 V; enum {LANES=16};
#define SET(x) _mm512_set1_ps(x)
#define FMA(a,b,c) _mm512_fmadd_ps(a,b,c)
static float hsum(V v){return _mm512_reduce_add_ps(v);}
#else
typedef __m256 V; enum {LANES=8};
#define SET(x) _mm256_set1_ps(x)
#define FMA(a,b,c) _mm256_fmadd_ps(a,b,c)
static float hsum(V v){float t[8];_mm256_storeu_ps(t,v);float s=0;for(int i=0;i<8;i++)s+=t[i];return s;}
#endif
#define R(i) a##i=FMA(a##i,b,c);
__attribute__((noinline)) float kernel(long it){
 V a0=SET(1.0f),a1=SET(1.1f),a2=SET(1.2f),a3=SET(1.3f),a4=SET(1.4f),a5=SET(1.5f),
   a6=SET(1.6f),a7=SET(1.7f),a8=SET(1.8f),a9=SET(1.9f),a10=SET(2.0f),a11=SET(2.1f);
 V b=SET(0.999999f),c=SET(1e-7f);
 for(long i=0;i<it;i++){R(0)R(1)R(2)R(3)R(4)R(5)R(6)R(7)R(8)R(9)R(10)R(11)}
 return hsum(a0)+hsum(a1)+hsum(a2)+hsum(a3)+hsum(a4)+hsum(a5)+hsum(a6)+hsum(a7)
       +hsum(a8)+hsum(a9)+hsum(a10)+hsum(a11);}
int main(int argc,char**argv){long it=argc>1?atol(argv[1]):20000000;int reps=argc>2?atoi(argv[2]):5;
 double best=0;float sink=0;
 for(int r=0;r<reps;r++){double t0=now();sink+=kernel(it);double dt=now()-t0;
  double g=it*12.0*LANES*2/dt/1e9;if(g>best)best=g;}
 printf("{\"gflops\": %.2f, \"lanes\": %d, \"sink\": %.1f}\n",best,LANES,sink>0?1.0:0.0);return 0;}
"""


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name (Linux), or ``unknown``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def simd_summary() -> list[str]:
    """The SIMD flags that matter for fp32 FMA and int8 dot products."""
    keep = ("avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "avx2", "fma", "amx_int8")
    flags = _cpu_flags()
    return [f for f in keep if f in flags]


def fma_peak(threads: int, *, iterations: int = 20_000_000, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of the FMA kernel: one core, and ``threads`` processes at once (summed)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return {}
    flags = _cpu_flags()
    arch = ["-mavx512f", "-mfma"] if "avx512f" in flags else ["-mavx2", "-mfma"]
    if "fma" not in flags and "avx512f" not in flags:
        return {}
    with tempfile.TemporaryDirectory(prefix="medcad-peak-") as tmp:
        src, exe = Path(tmp) / "fma.c", Path(tmp) / "fma"
        src.write_text(_FMA_C)
        subprocess.run([cc, "-O2", *arch, "-o", str(exe), str(src)], check=True)
        args = [str(exe), str(iterations), str(reps)]
        one = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
        procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True) for _ in range(threads)]
        many = [json.loads(p.communicate()[0]) for p in procs]
    return {
        "fma_gflops_1core": float(one["gflops"]),
        "fma_gflops_all": float(sum(m["gflops"] for m in many)),
        "fma_lanes": float(one["lanes"]),
    }


def numpy_matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` GFLOP/s of an n × n fp32 numpy matmul (numpy's own BLAS threads)."""
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def ort_matmul_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` GFLOP/s of an n × n fp32 MatMul in onnxruntime at ``threads`` threads."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

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
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(
        onnx.shape_inference.infer_shapes(model).SerializeToString(),
        so,
        providers=["CPUExecutionProvider"],
    )
    rng = np.random.default_rng(0)
    feed = {"a": rng.random((n, n), dtype=np.float32), "b": rng.random((n, n), dtype=np.float32)}
    sess.run(None, feed)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feed)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def measure_peak(threads: int, *, quick: bool = False) -> dict[str, float]:
    """All three calibrations; ``peak_gflops`` is the largest at ``threads`` cores."""
    out: dict[str, float] = {}
    out.update(fma_peak(threads, iterations=10_000_000 if quick else 20_000_000))
    n = 1024 if quick else 2048
    out["ort_matmul_gflops"] = ort_matmul_gflops(threads, n=n)
    out["ort_matmul_gflops_1thread"] = ort_matmul_gflops(1, n=n)
    out["numpy_matmul_gflops"] = numpy_matmul_gflops(n=n)
    out["peak_gflops"] = max(
        out.get("fma_gflops_all", 0.0), out["ort_matmul_gflops"], out["numpy_matmul_gflops"]
    )
    out["peak_gflops_1core"] = max(
        out.get("fma_gflops_1core", 0.0), out["ort_matmul_gflops_1thread"]
    )
    out["threads"] = float(threads)
    return out
