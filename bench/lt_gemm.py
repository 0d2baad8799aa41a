"""``y = x @ w.T`` through cuBLASLt with any algorithm of its heuristic's list, for the probe.

torch's ``F.linear`` takes the first algorithm cuBLAS's heuristic ranks. ``LtGemm`` lists the
ranked candidates (tiles, split-K counts, stages) and launches any of them, so
``bench/lt_gemm_probe.py`` can time them on decode's skinny shapes. Bound through ctypes to the
libcublasLt torch itself loaded. On an H200 (bench/RESULTS.md, session 11) the best candidate
per shape made a 32-layer decode GEMM chain 1-3% faster at 16-64 rows and slower at 256, so the
engine does not use it.

Row-major ``y[M, N] = x[M, K] @ w[N, K]^T`` is column-major ``y^T[N, M] = op(w)[N, K] x^T[K, M]``
with op = transpose, the layout cuBLAS calls "TN" (what F.linear runs)::

    A = w : col-major [K, N], ld K, transa = T      B = x : col-major [K, M], ld K
    D = y : col-major [N, M], ld N
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch

_COMPUTE_32F = 68  # cublasComputeType_t CUBLAS_COMPUTE_32F
_R_32F, _R_16F, _R_16BF = 0, 2, 14  # cudaDataType_t
_DESC_TRANSA, _DESC_TRANSB = 3, 4  # cublasLtMatmulDescAttributes_t
_PREF_MAX_WORKSPACE = 1  # cublasLtMatmulPreferenceAttributes_t
_OP_N, _OP_T = 0, 1
# cublasLtMatmulAlgoConfigAttributes_t: what a candidate is, for reports.
_CONFIG = {"algo": 0, "tile": 1, "splitk": 2, "reduction": 3, "swizzle": 4, "custom": 5, "stages": 6}
_DTYPES = {torch.bfloat16: _R_16BF, torch.float16: _R_16F}


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


assert ctypes.sizeof(_Heuristic) == 96, "cublasLtMatmulHeuristicResult_t is 96 bytes"


def loaded_library_path() -> str:
    """Path of the libcublasLt torch has mapped into this process (after one CUDA matmul)."""
    a = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
    torch.mm(a, a)
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libcublasLt.so" in line:
                return line.split()[-1]
    raise RuntimeError("torch has not loaded libcublasLt in this process")


class _Lib:
    """The C entry points with their argument types (wrong widths would corrupt the stack)."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        vp, c_int, u64, i64, sz = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64,
                                   ctypes.c_size_t)
        sigs: dict[str, list[Any]] = {
            "cublasLtCreate": [ctypes.POINTER(vp)],
            "cublasLtMatmulDescCreate": [ctypes.POINTER(vp), c_int, c_int],
            "cublasLtMatmulDescSetAttribute": [vp, c_int, vp, sz],
            "cublasLtMatrixLayoutCreate": [ctypes.POINTER(vp), c_int, u64, u64, i64],
            "cublasLtMatmulPreferenceCreate": [ctypes.POINTER(vp)],
            "cublasLtMatmulPreferenceSetAttribute": [vp, c_int, vp, sz],
            "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, c_int,
                                               ctypes.POINTER(_Heuristic), ctypes.POINTER(c_int)],
            "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp,
                               ctypes.POINTER(_Algo), vp, sz, vp],
            "cublasLtMatmulAlgoConfigGetAttribute": [ctypes.POINTER(_Algo), c_int, vp, sz,
                                                     ctypes.POINTER(sz)],
        }
        for name, argtypes in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, c_int
            setattr(self, name, fn)
        self.lib = lib

    def call(self, name: str, *args: Any) -> None:
        status = getattr(self, name)(*args)
        if status != 0:
            raise RuntimeError(f"{name} returned cublasStatus_t {status}")


@dataclass(frozen=True)
class Candidate:
    """One algorithm cuBLASLt offered for a shape (its rank in the heuristic's list = index)."""

    rank: int
    workspace: int
    config: dict[str, int]
    algo: Any  # _Algo, kept for launches


class _Shape:
    """The descriptors of one (M, N, K, dtype) problem; cuBLASLt reads them at each launch."""

    def __init__(self, lib: _Lib, m: int, n: int, k: int, dtype: torch.dtype) -> None:
        self.lib = lib
        self.desc, self.a, self.b, self.d = (ctypes.c_void_p() for _ in range(4))
        lib.call("cublasLtMatmulDescCreate", ctypes.byref(self.desc), _COMPUTE_32F, _R_32F)
        for attr, op in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            value = ctypes.c_int32(op)
            lib.call("cublasLtMatmulDescSetAttribute", self.desc, attr, ctypes.byref(value), 4)
        t = _DTYPES[dtype]
        lib.call("cublasLtMatrixLayoutCreate", ctypes.byref(self.a), t, k, n, k)
        lib.call("cublasLtMatrixLayoutCreate", ctypes.byref(self.b), t, k, m, k)
        lib.call("cublasLtMatrixLayoutCreate", ctypes.byref(self.d), t, n, m, n)


class LtGemm:
    """cuBLASLt matmuls on one device, with one workspace shared by every launch."""

    def __init__(self, device: torch.device, workspace_bytes: int = 32 << 20) -> None:
        assert device.type == "cuda", f"cuBLASLt needs a CUDA device, got {device}"
        self.device = device
        self.lib = _Lib(loaded_library_path())
        self.handle = ctypes.c_void_p()
        self.lib.call("cublasLtCreate", ctypes.byref(self.handle))
        self.workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self.pref = ctypes.c_void_p()
        self.lib.call("cublasLtMatmulPreferenceCreate", ctypes.byref(self.pref))
        limit = ctypes.c_uint64(workspace_bytes)
        self.lib.call("cublasLtMatmulPreferenceSetAttribute", self.pref, _PREF_MAX_WORKSPACE,
                      ctypes.byref(limit), 8)
        self._shapes: dict[tuple[int, int, int, torch.dtype], _Shape] = {}
        self._alpha, self._beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def _shape(self, m: int, n: int, k: int, dtype: torch.dtype) -> _Shape:
        key = (m, n, k, dtype)
        if key not in self._shapes:
            self._shapes[key] = _Shape(self.lib, m, n, k, dtype)
        return self._shapes[key]

    def candidates(self, m: int, n: int, k: int, dtype: torch.dtype,
                   limit: int = 32) -> list[Candidate]:
        """The heuristic's ranked algorithms for ``[m, k] @ [n, k]^T`` (at most ``limit``)."""
        s = self._shape(m, n, k, dtype)
        results = (_Heuristic * limit)()
        count = ctypes.c_int(0)
        self.lib.call("cublasLtMatmulAlgoGetHeuristic", self.handle, s.desc, s.a, s.b, s.d, s.d,
                      self.pref, limit, results, ctypes.byref(count))
        out = []
        for rank in range(count.value):
            r = results[rank]
            if r.state != 0:
                continue
            config = {}
            for name, attr in _CONFIG.items():
                value, written = ctypes.c_uint32(0), ctypes.c_size_t(0)
                self.lib.call("cublasLtMatmulAlgoConfigGetAttribute", ctypes.byref(r.algo), attr,
                              ctypes.byref(value), 4, ctypes.byref(written))
                config[name] = int(value.value)
            algo = _Algo()
            ctypes.memmove(ctypes.byref(algo), ctypes.byref(r.algo), ctypes.sizeof(_Algo))
            out.append(Candidate(rank, int(r.workspace_size), config, algo))
        return out

    def matmul(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
               candidate: Candidate) -> torch.Tensor:
        """out[M, N] = x[M, K] @ w[N, K]^T on the current stream (graph-capturable)."""
        m, k = x.shape
        n = w.shape[0]
        assert w.shape[1] == k and out.shape == (m, n), f"shapes {x.shape} {w.shape} {out.shape}"
        assert x.is_contiguous() and w.is_contiguous() and out.is_contiguous(), "row-major only"
        assert candidate.workspace <= self.workspace.numel(), "candidate needs more workspace"
        s = self._shape(m, n, k, x.dtype)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self.lib.call("cublasLtMatmul", self.handle, s.desc, ctypes.byref(self._alpha),
                      w.data_ptr(), s.a, x.data_ptr(), s.b, ctypes.byref(self._beta),
                      out.data_ptr(), s.d, out.data_ptr(), s.d, ctypes.byref(candidate.algo),
                      self.workspace.data_ptr(), self.workspace.numel(), stream)
        return out
