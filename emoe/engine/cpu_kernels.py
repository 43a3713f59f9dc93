"""CPU fast paths for the engine, each with plain torch as the fallback.

On CPU, PyTorch sends float32 matmuls to MKL's sgemm. On the AMD EPYC boxes this project is
measured on, that kernel is slow for both of the engine's shapes (docs/engine.md has the numbers):

* **Few tokens (decode).** Each expert sees one to a few rows, and sgemm spends most of its time
  packing the weight matrix it then reads once. :func:`fused_expert_mlp` is one numba-compiled
  pass over the routed experts instead: gate, up, SiLU, down and the gate-weighted sum, reading
  each used expert's weights once for all of its tokens. It runs on up to
  ``FUSED_MAX_TOKENS`` tokens at one torch thread (a share of that at more threads).
* **Many rows (prefill).** With ``ONEDNN_MIN_ROWS`` rows or more, :func:`linear` calls oneDNN,
  which PyTorch ships and whose JIT-compiled kernels use AVX-512 here: about 2x sgemm's
  throughput. Below that, its ~10 us call overhead loses to sgemm. :func:`grouped_expert_mlp`
  runs experts on one gathered batch whose groups are already padded for it, and
  :func:`prefill_attention` builds causal attention over a prefill chunk from the same matmuls
  with a numba softmax that skips the keys a query cannot see.

Smaller ops where torch's CPU kernels are slow for the engine's shapes: :func:`rms_norm` (one
pass per row instead of six ops) and :func:`softmax` (router rows shorter than a vector).

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
    step = 32
    while step * 8 <= rows:
        step *= 2
    return -(-rows // step) * step


def _onednn_matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [R, In] @ weight[Out, In].T (+ bias) through oneDNN, with no checks: float32 CPU
    tensors outside autograd, R on the :func:`padded_rows` grid (else oneDNN compiles a kernel
    for a new shape)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x [..., In], weight [Out, In] -> [..., Out]."""
    # _plain_cpu_float32's checks, inlined and after the row count (decode steps stop there):
    # this runs for every matmul of every step
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (rows >= ONEDNN_MIN_ROWS and ENABLED and _ONEDNN and x.dtype is torch.float32
            and x.device.type == "cpu" and weight.dtype is torch.float32 and weight.is_contiguous()
            and (bias is None or bias.dtype is torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        x2, pad = x.reshape(rows, x.shape[-1]), padded_rows(rows) - rows  # [rows, In]
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))  # [R, In]
        out = _onednn_matmul(x2, weight, bias)  # [R, Out]
        return (out[:rows] if pad else out).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def rms_norm_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`rms_norm` may run on these tensors."""
    return _plain_cpu_float32(x, weight) and weight.is_contiguous()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``F.rms_norm(x, weight.shape, weight, eps)`` over the last dim in one pass per row.

    torch's CPU rms_norm is six elementwise ops: 20 us for [512, 128] and 7 us for one row,
    against 7 and 3 us here. Check :func:`rms_norm_applies` first.
    """
    out = torch.empty(x.shape, dtype=x.dtype)
    _rms_norm_kernel(x.reshape(-1, x.shape[-1]).numpy(), weight.numpy(), np.float32(eps),
                     out.view(-1, x.shape[-1]).numpy())
    return out


def softmax(x: Tensor) -> Tensor:
    """``x.softmax(dim=-1)`` for x [T, E], faster for router logits: many rows of few experts.

    torch's CPU softmax over the last dim vectorises along a row, and falls back to scalar code
    for rows shorter than a vector: 50 us for [512, 8]. Over dim 0 of the transposed view, it
    vectorises across rows instead: 7.5 us. That loses for fewer than 64 rows, and for rows of
    16 or more (measured), so only the short-row, many-row case takes it.
    """
    if x.shape[-1] < 16 and x.dim() == 2 and x.shape[0] >= 64 and _plain_cpu_float32(x):
        return x.t().softmax(dim=0).t()
    return x.softmax(dim=-1)


def prefill_attention_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether :func:`prefill_attention` may run on these tensors."""
    return _ONEDNN and q.shape[0] >= ONEDNN_MIN_ROWS and _plain_cpu_float32(q, k, v)


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
    """Causal attention of n new tokens at positions ``start``.. over the keys before them.

    q [n, Hq, D]; k/v [Hkv, P, D] are one sequence's cached keys/values (rotary applied), of
    which positions 0..start+n-1 are filled -> [n, Hq, D]. Query heads are grouped onto key heads
    (GQA). Queries run in blocks of up to ``QUERY_BLOCK`` whose scores fit
    ``SCORE_BLOCK_ELEMENTS``; each block reads only the keys it can see, which skips about a
    quarter of a 512-token prompt's scores, and the softmax (:func:`_causal_softmax`) skips the
    keys each query cannot see instead of masking them. Block rows and key counts are padded to
    :func:`padded_rows` (keys up to P); padded rows are dropped. Padded keys get probability 0,
    and v's unfilled positions among them are zeroed first: an earlier request's values may sit
    there, and 0 * NaN would be NaN. Check :func:`prefill_attention_applies` first.
    """
    n, num_heads, head_dim = q.shape
    num_kv_heads, positions = k.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    block = max(1, min(n, QUERY_BLOCK, SCORE_BLOCK_ELEMENTS // (group * (start + n))))
    scale = np.float32(head_dim ** -0.5)
    v[:, start + n:min(padded_rows(start + n), positions)] = 0  # positions not written yet
    out = q.new_empty(n, num_heads, head_dim)  # [n, Hq, D]
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        rows, keys = padded_rows(hi - lo), min(padded_rows(start + hi), positions)
        qb = F.pad(q[lo:hi].transpose(0, 1), (0, 0, 0, rows - (hi - lo))).contiguous()  # [Hq, rows, D]
        for h in range(num_kv_heads):
            heads = slice(h * group, (h + 1) * group)
            qh = qb[heads].view(group * rows, head_dim)  # [G*rows, D]
            probs = _onednn_matmul(qh, k[h, :keys])  # [G*rows, keys]
            _causal_softmax(probs.numpy(), rows, start + lo, scale)
            vt = v[h, :keys].t()  # [D, keys], a transposed view: oneDNN reads it in place
            o = _onednn_matmul(probs, vt).view(group, rows, head_dim)  # [G, rows, D]
            out[lo:hi, heads] = o[:, :hi - lo].transpose(0, 1)
    return out


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


def grouped_expert_mlp_applies(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> bool:
    """Whether :func:`grouped_expert_mlp` may run on these tensors."""
    return _ONEDNN and _plain_cpu_float32(x, w1, w3, w2) and all(_rows_contiguous(w) for w in (w1, w3, w2))


def grouped_expert_mlp(x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """The routed-expert output of :func:`emoe.engine.model.expert_mlp` for many tokens.

    Token-expert pairs are grouped by expert into one gathered batch in which each expert's
    group is already padded to :func:`padded_rows` (with ``ONEDNN_MIN_ROWS`` rows or more), so
    each expert runs its three oneDNN matmuls with no padding copies. Padding rows repeat a real
    token and are dropped when the gate-weighted outputs are summed per token. Same arguments as
    :func:`fused_expert_mlp`; check :func:`grouped_expert_mlp_applies` first.
    """
    num_tokens = x.shape[0]
    source, target, gates, sizes = _group_by_expert(ids.long().contiguous().numpy(),
                                                    weights.float().contiguous().numpy(), w1.shape[0],
                                                    ONEDNN_MIN_ROWS)
    xs = x.index_select(0, torch.from_numpy(source))  # [R, H], each expert's rows together
    outs = []
    start = 0
    for n, gate_w, up_w, down_w in zip(sizes.tolist(), w1.unbind(0), w3.unbind(0), w2.unbind(0)):
        if n:
            # the group's rows are on the grid already, and all checks of linear() hold
            mm = _onednn_matmul if n >= ONEDNN_MIN_ROWS else F.linear
            xe = xs[start:start + n]  # [n, H]
            h = F.silu(mm(xe, gate_w), inplace=True).mul_(mm(xe, up_w))  # [n, F]
            outs.append(mm(h, down_w))  # [n, H]
            start += n
    ys = torch.cat(outs).mul_(torch.from_numpy(gates)[:, None])  # [R, H]
    # padding rows land on an extra row that is cut off
    return x.new_zeros(num_tokens + 1, x.shape[1]).index_add_(0, torch.from_numpy(target), ys)[:num_tokens]


def _flat(w: Tensor) -> tuple[np.ndarray, int]:
    """A stack of matrices [E, R, C] as (one C-contiguous [rows, C] array, rows from w[e] to w[e+1]).

    A slot pool's views are strided between slots; handing numba one contiguous 2-D array
    instead of a strided 3-D one keeps its inner loops contiguous, so they vectorise (10x faster).
    """
    step = w.stride(0) // w.shape[2]
    rows = (w.shape[0] - 1) * step + w.shape[1]
    return w.as_strided((rows, w.shape[2]), (w.shape[2], 1), w.storage_offset()).numpy(), step


def _compile(fn, fastmath: frozenset[str] = frozenset({"reassoc", "nsz"})):
    """numba-compile ``fn`` on first call, reusing the machine code on disk where numba finds a
    writable cache folder (next to this file, else the user's cache) and not caching otherwise.

    By default sums may be reassociated (so that they vectorise) while NaN and inf are kept, and
    multiply-adds are not fused, so products and sums round as torch's do.
    """
    try:
        return numba.njit(cache=True, fastmath=set(fastmath), nogil=True)(fn)
    except RuntimeError:  # no cache location: a read-only install without a writable home
        return numba.njit(fastmath=set(fastmath), nogil=True)(fn)


_padded_rows_compiled = numba.njit(padded_rows)


@_compile
def _check_expert_ids(ids, num_experts):  # pragma: no cover - compiled by numba
    """Raise IndexError for an id outside [0, num_experts): numba does not check bounds, and
    the kernels would read or write past their arrays."""
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            if not 0 <= ids[t, k] < num_experts:
                raise IndexError("expert_mlp: an expert id is outside the stacked experts")


@_compile
def _group_by_expert(ids, gates, num_experts, min_rows):  # pragma: no cover - compiled by numba
    """Rows of the padded, grouped batch of :func:`grouped_expert_mlp`.

    ids/gates [T, K] -> source [R] (the token each row reads), target [R] (the token it adds
    to; T for padding rows), row_gates [R] (0 for padding) and the group size of each expert
    [E] (its pair count, padded to :func:`padded_rows` from ``min_rows`` pairs).
    """
    num_tokens, top_k = ids.shape
    _check_expert_ids(ids, num_experts)
    counts = np.zeros(num_experts, dtype=np.int64)
    for t in range(num_tokens):
        for k in range(top_k):
            counts[ids[t, k]] += 1
    sizes = counts.copy()
    starts = np.zeros(num_experts, dtype=np.int64)  # each group's first row
    total = 0
    for e in range(num_experts):
        if counts[e] >= min_rows:
            sizes[e] = _padded_rows_compiled(counts[e])
        starts[e] = total
        total += sizes[e]
    source = np.empty(total, dtype=np.int64)
    target = np.empty(total, dtype=np.int64)
    row_gates = np.zeros(total, dtype=np.float32)
    fill = starts.copy()
    for t in range(num_tokens):  # token order within each group, as a stable sort gives
        for k in range(top_k):
            e, r = ids[t, k], fill[ids[t, k]]
            source[r], target[r], row_gates[r] = t, t, gates[t, k]
            fill[e] = r + 1
    for e in range(num_experts):
        for r in range(fill[e], starts[e] + sizes[e]):
            source[r], target[r] = source[starts[e]], num_tokens
    return source, target, row_gates, sizes


@_compile
def _expert_mlp_kernel(x, gates, ids, num_experts, ffn, hidden, w1, step1, w3, step3, w2, step2,
                       out):  # pragma: no cover - compiled by numba
    """out[t] += sum_k gates[t, k] * expert_{ids[t, k]}(x[t]); each used expert is read once.

    Expert e's gate and up matrices [F, H] start at row e * step1 of w1 and e * step3 of w3,
    its down matrix [H, F] at row e * step2 of w2.
    """
    num_tokens, top_k = ids.shape
    _check_expert_ids(ids, num_experts)
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


@_compile
def _rms_norm_kernel(x, weight, eps, out):  # pragma: no cover - compiled by numba
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, as torch computes it; x/out [T, H]."""
    num_rows, hidden = x.shape
    for t in range(num_rows):
        squares = np.float32(0.0)
        for j in range(hidden):
            squares += x[t, j] * x[t, j]
        inv = np.float32(1.0) / np.sqrt(squares / np.float32(hidden) + eps)
        for j in range(hidden):
            out[t, j] = x[t, j] * inv * weight[j]


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 = hi + lo, hi exact in 9 bits
_EXP_MIN = np.float32(-87.0)  # exp() below this is taken as 0 (float32's smallest normal is e^-87.3)


@_compile
def _causal_softmax(scores, rows, first_position, scale):  # pragma: no cover - compiled by numba
    """In place over scores [G*rows, keys] of a query block: row r holds the raw scores of the
    query at position ``first_position + r % rows``, which sees keys 0..that position. Each row
    becomes softmax(scale * scores) over the keys it sees, and 0 for the keys after.

    NaN or +inf in what a row sees makes the whole row NaN, as torch's softmax does.
    """
    num_rows, keys = scores.shape
    bits = np.empty(keys + 1, dtype=np.int32)  # 2^n of each exp(), then the row max, as float32 bits
    powers = bits[:keys].view(np.float32)
    row_max = bits[keys:].view(np.float32)
    for r in range(num_rows):
        s = scores[r]
        seen = min(keys, first_position + r % rows + 1)
        bits[keys] = _row_max_bits(s, seen)
        _exp_parts(s, seen, row_max[0], scale, bits)
        total = np.float32(0.0)
        for j in range(seen):
            s[j] *= powers[j]
            total += s[j]
        inv = np.float32(1.0) / total
        for j in range(seen):
            s[j] *= inv
        for j in range(seen, keys):
            s[j] = np.float32(0.0)


@_compile
def _row_max_bits(s, n):  # pragma: no cover - compiled by numba
    """The float32 bits of max(s[:n]), through an integer key that orders like the floats.

    LLVM vectorises integer max reductions but not float ones without the no-NaN function
    attribute, which numba cannot set; this is 4x faster. A NaN in s may or may not win; the
    caller's exp() turns a NaN into a NaN row either way.
    """
    ints = s.view(np.int32)
    top = np.int32(-2147483648)
    for j in range(n):
        key = ints[j] ^ ((ints[j] >> 31) & np.int32(0x7FFFFFFF))  # flip negatives' magnitude bits
        top = key if key > top else top
    return top ^ ((top >> 31) & np.int32(0x7FFFFFFF))


@functools.partial(_compile, fastmath=frozenset({"contract"}))
def _exp_parts(s, n, shift, scale, bits):  # pragma: no cover - compiled by numba
    """exp((s[j] - shift) * scale) for j < n, split as s[j] * 2^bits[j] (bits: float32 bits of 2^k).

    Cody-Waite reduction and Cephes' expf polynomial, vectorised by LLVM (numba's exp() is a
    scalar libm call); within 1.02 ulp of exp() over [-87, 0], measured. Multiply-adds may fuse,
    sums are not reordered. Exponents below _EXP_MIN give 0.
    """
    for j in range(n):
        t = (s[j] - shift) * scale
        u = _EXP_MIN if t < _EXP_MIN else t  # a NaN t stays NaN
        k = np.floor(u * _LOG2E + np.float32(0.5))
        f = u - k * _LN2_HI - k * _LN2_LO
        p = np.float32(1.9875691500e-4)
        p = p * f + np.float32(1.3981999507e-3)
        p = p * f + np.float32(8.3334519073e-3)
        p = p * f + np.float32(4.1665795894e-2)
        p = p * f + np.float32(1.6666665459e-1)
        p = p * f + np.float32(5.0000001201e-1)
        s[j] = p * f * f + f + np.float32(1.0)
        bits[j] = 0 if t < _EXP_MIN else (np.int32(k) + np.int32(127)) << 23

