"""CPU fast paths for the engine's matmuls, each with plain torch as the fallback.

On CPU, PyTorch sends float32 matmuls to MKL's sgemm. On the AMD EPYC boxes this project is
measured on, that kernel is slow for both of the engine's shapes (docs/engine.md has the numbers):

* **Few tokens (decode).** Each expert sees one to a few rows, and sgemm spends most of its time
  packing the weight matrix it then reads once. :func:`fused_expert_mlp` is one numba-compiled
  pass over the routed experts instead: gate, up, SiLU, down and the gate-weighted sum, reading
  each used expert's weights once for all of its tokens. It runs on up to
  ``FUSED_MAX_TOKENS`` tokens at one torch thread (a share of that at more threads).
* **Many rows (prefill).** With ``ONEDNN_MIN_ROWS`` rows or more, :func:`linear` calls oneDNN,
  which PyTorch ships and whose JIT-compiled kernels use AVX-512 here: about 2x sgemm's
  throughput. Below that, its ~10 us call overhead loses to sgemm. :func:`prefill_attention` builds causal
  attention over a prefill chunk from the same oneDNN matmuls; it is 1.4x faster than
  PyTorch's flash attention for CPU at 512 tokens.

These paths run only for float32 tensors on the CPU, outside autograd. Set
``EMOE_CPU_KERNELS=0`` (or ``cpu_kernels.ENABLED = False``) to run plain torch everywhere, to
compare or debug.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ENABLED = os.environ.get("EMOE_CPU_KERNELS", "1") != "0"
FUSED_MAX_TOKENS = 64
ONEDNN_MIN_ROWS = 48
QUERY_BLOCK = 256  # prefill_attention's queries per block: later blocks see more keys
SCORE_BLOCK_ELEMENTS = 1 << 22  # attention scores held at once by prefill_attention (16 MiB)


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_linear_available()


def keep_freed_host_memory() -> bool:
    """Make glibc keep freed blocks of up to 32 MiB for reuse instead of returning them to the OS.

    A prefill step allocates and frees activations of a few MiB per op. By default glibc maps
    each from the kernel afresh, and first touch of the new pages (faults, zeroing) cost as much
    as the matmul that fills them. PyTorch's CPU tuning guide suggests jemalloc or tcmalloc for
    this; here glibc's own thresholds are raised (``mallopt``), so the process keeps its peak
    heap. Affects the whole process; returns False where the C library is not glibc.
    """
    if not ENABLED:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def _plain_cpu_float32(*tensors: Tensor) -> bool:
    """True when every tensor is float32 on the CPU and no autograd graph is being recorded."""
    if not ENABLED:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def padded_rows(rows: int) -> int:
    """``rows`` rounded up to a grid of 32-row steps, then four steps per doubling (<= 25% pad).

    oneDNN compiles a kernel for every new matrix shape it sees (0.4-1.5 ms, against 50 us for
    the matmul itself) and caches about a thousand. Padding the varying dimension to this grid
    bounds the shapes a model ever uses, so after warm-up every call hits the cache.
    """
    step = max(32, 1 << max(0, rows.bit_length() - 3))
    return -(-rows // step) * step


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x [..., In], weight [Out, In] -> [..., Out]."""
    # _plain_cpu_float32's checks, inlined: this runs for every matmul of every step
    if (ENABLED and _ONEDNN and x.dtype is torch.float32 and x.device.type == "cpu"
            and weight.dtype is torch.float32 and weight.is_contiguous() and x.shape[-1]
            and (bias is None or bias.dtype is torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        rows = x.numel() // x.shape[-1]
        if rows >= ONEDNN_MIN_ROWS:
            x2, pad = x.reshape(rows, x.shape[-1]), padded_rows(rows) - rows  # [rows, In]
            if pad:
                x2 = F.pad(x2, (0, 0, 0, pad))  # [R, In]
            out = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")  # [R, Out]
            return (out[:rows] if pad else out).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def prefill_attention_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether :func:`prefill_attention` may run on these tensors."""
    return _ONEDNN and q.shape[0] >= ONEDNN_MIN_ROWS and _plain_cpu_float32(q, k, v)


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
    """Causal attention of n new tokens at positions ``start``.. over the keys before them.

    q [n, Hq, D]; k/v [Hkv, P, D] are one sequence's cached keys/values (rotary applied), of
    which positions 0..start+n-1 are filled -> [n, Hq, D]. Query heads are grouped onto key heads
    (GQA). Queries run in blocks of up to ``QUERY_BLOCK`` whose scores fit
    ``SCORE_BLOCK_ELEMENTS``; each block reads only the keys it can see, which skips about a
    quarter of a 512-token prompt's scores. Block rows and key counts are padded to
    :func:`padded_rows` (keys up to P); padded keys are masked and padded rows dropped. Check
    :func:`prefill_attention_applies` first.
    """
    n, num_heads, head_dim = q.shape
    num_kv_heads, positions = k.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    block = max(1, min(n, QUERY_BLOCK, SCORE_BLOCK_ELEMENTS // (group * (start + n))))
    out = q.new_empty(n, num_heads, head_dim)  # [n, Hq, D]
    matmul = torch.ops.mkldnn._linear_pointwise
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        rows, keys = padded_rows(hi - lo), min(padded_rows(start + hi), positions)
        qb = F.pad((q[lo:hi] * head_dim ** -0.5).transpose(0, 1), (0, 0, 0, rows - (hi - lo)))  # [Hq, rows, D]
        mask = _causal_mask(rows, keys - start - lo)  # [rows, keys - start - lo]
        for h in range(num_kv_heads):
            heads = slice(h * group, (h + 1) * group)
            qh = qb[heads].reshape(group * rows, head_dim)  # [G*rows, D]
            scores = matmul(qh, k[h, :keys], None, "none", [], "").view(group, rows, keys)  # [G, rows, keys]
            scores[:, :, start + lo:] += mask  # the block's own and padded keys
            probs = scores.softmax(dim=-1).view(group * rows, keys)  # [G*rows, keys]
            vt = v[h, :keys].t().contiguous()  # [D, keys]
            o = matmul(probs, vt, None, "none", [], "").view(group, rows, head_dim)  # [G, rows, D]
            out[lo:hi, heads] = o[:, :hi - lo].transpose(0, 1)
    return out


@functools.lru_cache(maxsize=16)
def _causal_mask(rows: int, cols: int) -> Tensor:
    """[rows, cols] float32: 0 where col <= row, -inf after (a query sees no later key)."""
    return torch.full((rows, cols), float("-inf")).triu_(1)


def fused_expert_mlp_applies(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> bool:
    """Whether :func:`fused_expert_mlp` may run on these tensors.

    The kernel runs on one thread while torch's matmuls use all of torch's threads, so the
    token limit is divided among them (measured at 1 and 2 threads: the crossover halves).
    """
    return (x.shape[0] * torch.get_num_threads() <= FUSED_MAX_TOKENS and _plain_cpu_float32(x, w1, w3, w2)
            and all(_rows_contiguous(w) for w in (w1, w3, w2)))


def _rows_contiguous(w: Tensor) -> bool:
    """Each w[e] is one contiguous matrix, a whole number of rows apart (as in a slot pool)."""
    return w.stride(2) == 1 and w.stride(1) == w.shape[2] and w.stride(0) % w.shape[2] == 0


def fused_expert_mlp(x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """The routed-expert output of :func:`emoe.engine.model.expert_mlp`, computed in one pass.

    x [T, H] float32, weights [T, K], ids [T, K] into w1/w3 [E, F, H] and w2 [E, H, F] -> [T, H].
    Check :func:`fused_expert_mlp_applies` first.
    """
    out = torch.zeros_like(x)  # [T, H]
    _expert_mlp_kernel(x.contiguous().numpy(), weights.float().contiguous().numpy(),
                       ids.long().contiguous().numpy(), w1.shape[0], w1.shape[1], x.shape[1],
                       *_flat(w1), *_flat(w3), *_flat(w2), out.numpy())
    return out


def _flat(w: Tensor) -> tuple[np.ndarray, int]:
    """A stack of matrices [E, R, C] as (one C-contiguous [rows, C] array, rows from w[e] to w[e+1]).

    A slot pool's views are strided between slots; handing numba one contiguous 2-D array
    instead of a strided 3-D one keeps its inner loops contiguous, so they vectorise (10x faster).
    """
    step = w.stride(0) // w.shape[2]
    rows = (w.shape[0] - 1) * step + w.shape[1]
    return w.as_strided((rows, w.shape[2]), (w.shape[2], 1), w.storage_offset()).numpy(), step


def _compile(fn):
    """numba-compile ``fn`` on first call, reusing the machine code on disk where numba finds a
    writable cache folder (next to this file, else the user's cache) and not caching otherwise.
    """
    options = dict(fastmath={"reassoc", "nsz"}, nogil=True)  # vectorised sums; NaN and inf kept
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # no cache location: a read-only install without a writable home
        return numba.njit(**options)(fn)


@_compile
def _expert_mlp_kernel(x, gates, ids, num_experts, ffn, hidden, w1, step1, w3, step3, w2, step2,
                       out):  # pragma: no cover - compiled by numba
    """out[t] += sum_k gates[t, k] * expert_{ids[t, k]}(x[t]); each used expert is read once.

    Expert e's gate and up matrices [F, H] start at row e * step1 of w1 and e * step3 of w3,
    its down matrix [H, F] at row e * step2 of w2.
    """
    num_tokens, top_k = ids.shape
    act = np.empty((num_tokens * top_k, ffn), dtype=np.float32)  # SiLU(gate) * up per token
    rows = np.empty(num_tokens * top_k, dtype=np.int64)  # this expert's tokens
    row_gates = np.empty(num_tokens * top_k, dtype=np.float32)
    one = np.float32(1.0)
    for e in range(num_experts):
        m = 0
        for t in range(num_tokens):
            for k in range(top_k):
                if ids[t, k] == e:
                    rows[m] = t
                    row_gates[m] = gates[t, k]
                    m += 1
        if m == 0:
            continue
        for f in range(ffn):
            gate_row, up_row = w1[e * step1 + f], w3[e * step3 + f]
            for j in range(m):
                xr = x[rows[j]]
                g = np.float32(0.0)
                u = np.float32(0.0)
                for h in range(hidden):
                    g += gate_row[h] * xr[h]
                    u += up_row[h] * xr[h]
                act[j, f] = g / (one + np.exp(-g)) * u
        for h in range(hidden):
            down_row = w2[e * step2 + h]
            for j in range(m):
                s = np.float32(0.0)
                for f in range(ffn):
                    s += down_row[f] * act[j, f]
                out[rows[j], h] += row_gates[j] * s
