"""The reconstruction pass on the GPU: FlexAttention for the output, a Triton kernel for the score.

``reconstruct.score_rows`` needs two things of one causal pass on top of
``context`` cached keys: the attention output, and for every context key the
max (or mean) of its softmax probability over the scored queries and the
``g`` query heads of its KV head. The eager form materialises every score
tile in float32 and copies K/V ``g`` times; at LLaMA-8B shapes and 32K it took
~1.7 s a layer.

Why two passes and not one fused kernel: a probability needs its query's
log-sum-exp over *all* the keys that query sees (the pass's own keys too),
which a flash-style forward knows only after its row is done. So the forward
that the model needs anyway returns it (``compile.with_lse``), and a second kernel
recomputes ``q . k`` over the context keys alone and normalises with it: the
extra work is one ``Lq x context`` product, no exponential is stored
(BENCHMARKS.md: 18x faster than the eager form at 32K).

Why FlexAttention for the forward rather than a kernel of our own: it is the
prefill's tuned kernel (TMA loads on Hopper), compiled once for every length
the same way (``compile.length_generic``), and the pass is plain causal
attention offset by ``context`` (``kv_idx <= q_idx + context``). Its
BlockMask is built from tile indices directly, as ``masks.py`` does, not by
``create_block_mask``: that evaluates the mask on ``Lq x (context + Lq)``
(2 GB of booleans at 32K; the tests check the two agree). The offset is a
0-d tensor input of the graph, so a new context length does not re-trace the
mask. FlexAttention's log-sum-exp is in
natural log (torch converts its kernel's base-2 value; the tests and
``scripts/gpu_reconstruct_bench.py`` check it against ``torch.logsumexp``).

Why the score kernel has no atomics: one program owns one (row, KV head,
block of ``BLOCK_N`` context keys). It keeps its K tile, loops over the
scored rows of all ``g`` query heads laid end to end (head-major, so short
passes still fill whole ``BLOCK_M`` tiles), and reduces the probabilities in
registers; each output element is written once, so the result is
deterministic. Every context key is visible to every query (queries sit at
positions ``>= context``), so no causal mask applies to the score.

Tested on CPU: the score kernel (Triton's interpreter) and the forward's
mask, block indices and log-sum-exp convention, through *eager*
FlexAttention (Inductor's CPU FlexAttention has no log-sum-exp in torch 2.13,
and eager FlexAttention ignores the block indices, hence their separate
test). Not covered on CPU: the compiled FlexAttention kernel and the
tensor-core precision of the score's ``tl.dot`` (the GPU bench compares
with the eager ``"math"`` path).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .compile import kernel_options_for, length_generic, with_lse
from .decode import triton_supported
from .masks import KERNEL_BLOCK, tiled, whole_tiles

LOG2E = 1.0 / math.log(2.0)
# The fastest of BLOCK_M, BLOCK_N in {64, 128}, 4 or 8 warps, 2 or 3 stages in a development sweep on an
# H200 (bf16, D = 128, 32K context, 32 / 8 heads; not a recorded benchmark: re-check with
# scripts/gpu_reconstruct_bench.py).
BLOCK_M = 128
BLOCK_N = 128
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def _score_kernel(q_ptr, k_ptr, lse_ptr, out_ptr, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh,
                  stride_kn, stride_kd, stride_lb, stride_lh, stride_lm, stride_ob, stride_oh, stride_on,
                  context, scored_from, n_scored, qk_scale,
                  HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, USE_MAX: tl.constexpr, IEEE: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h = bh % HKV
    key = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_context = key < context
    d = tl.arange(0, D).to(tl.int64)
    # int64: row * stride passes 2**31 elements at long contexts x many heads.
    k = tl.load(k_ptr + b * stride_kb + h.to(tl.int64) * stride_kh + key.to(tl.int64)[:, None] * stride_kn
                + d[None, :] * stride_kd, mask=in_context[:, None], other=0.0)
    q_row = q_ptr + b * stride_qb
    lse_row = lse_ptr + b * stride_lb
    rows = G * n_scored
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, rows, BLOCK_M):
        r = start + tl.arange(0, BLOCK_M)
        scored = r < rows
        head = (h * G + r // n_scored).to(tl.int64)
        i = (scored_from + r % n_scored).to(tl.int64)
        q = tl.load(q_row + head[:, None] * stride_qh + i[:, None] * stride_qm + d[None, :] * stride_qd,
                    mask=scored[:, None], other=0.0)
        # An unscored row's lse of +inf makes its probabilities 0: no select per element.
        lse = tl.load(lse_row + head * stride_lh + i * stride_lm, mask=scored, other=float("inf"))
        # float32 inputs get full-precision dots (Triton would use TF32 on the GPU).
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        # exp(scaling * s - lse) in base 2: the scale and log2(e) fold into one multiply.
        p = tl.exp2(s * qk_scale - (lse * 1.4426950408889634)[:, None])
        if USE_MAX:
            acc = tl.maximum(acc, tl.max(p, 0))
        else:
            acc += tl.sum(p, 0)
    if not USE_MAX:
        acc = acc / rows
    tl.store(out_ptr + b * stride_ob + h * stride_oh + key * stride_on, acc, mask=in_context)


def supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the fused path can run: what the decode kernels need (``decode.triton_supported``:
    CUDA or CPU under ``TRITON_INTERPRET=1``, a power-of-two head dim >= 16, a half or float32
    dtype), and here a head dim <= 256, one dtype for q/k/v, and whole GQA groups."""
    return (triton_supported(query) and query.shape[-1] <= 256 and key.dtype == value.dtype == query.dtype
            and query.shape[1] % key.shape[1] == 0)


def launch_score(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scaling: float, context: int,
                 scored_from: int, reduce: str = "max", *, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                 num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> torch.Tensor:
    """Float32 ``[B, H_kv, context]``: max (or mean) over queries ``i >= scored_from`` and the ``g``
    query heads of ``exp(scaling * q_i . k_j - lse_i)``, for context keys ``j``.

    ``query [B, H_q, Lq, D]``, ``key [B, H_kv, >= context, D]``, ``lse`` float32
    ``[B, H_q, Lq]`` (natural log, of the scaled logits over every key the
    query sees); any strides.
    """
    bsz, hq, lq, d = query.shape
    hkv = key.shape[1]
    scored_from = min(max(scored_from, 0), lq)
    n_scored = lq - scored_from
    out = torch.zeros(bsz, hkv, context, dtype=torch.float32, device=query.device)
    if context == 0 or n_scored == 0:  # nothing scores: zeros, as the eager form leaves them
        return out
    grid = (triton.cdiv(context, block_n), bsz * hkv)
    _score_kernel[grid](
        query, key, lse, out, *query.stride(), *key.stride(), *lse.stride(), *out.stride(),
        context, scored_from, n_scored, scaling * LOG2E,
        HKV=hkv, G=hq // hkv, D=d, BLOCK_M=block_m, BLOCK_N=block_n, USE_MAX=reduce == "max",
        IEEE=query.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    return out


def offset_causal_block_indices(context: int, lq: int, lk: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``BlockMask.from_kv_blocks`` inputs for ``kv_idx <= q_idx + context``, ``lq`` queries, ``lk`` keys.

    Both lengths are whole tiles (the pass is padded to them). Query tile ``m``
    sees key tiles ``[0, partial_end)``; the first ``full_end`` of them wholly
    (no mask evaluated), the rest through the mask. Returns
    ``(kv_num, kv_idx, full_num, full_idx)``, broadcast over rows and heads.
    """
    t = KERNEL_BLOCK
    nq, nk = lq // t, lk // t
    q_first = torch.arange(nq, device=device) * t
    partial_end = torch.clamp((q_first + t - 1 + context) // t + 1, max=nk)
    full_end = torch.clamp((q_first + context + 1) // t, max=nk)
    tiles = torch.arange(nk, device=device)
    full_num = full_end.to(torch.int32).view(1, 1, nq)
    full_idx = tiles.to(torch.int32).expand(1, 1, nq, nk).contiguous()
    kv_num = (partial_end - full_end).to(torch.int32).view(1, 1, nq)
    kv_idx = torch.clamp(full_end[:, None] + tiles, max=nk - 1).to(torch.int32).view(1, 1, nq, nk)
    return kv_num, kv_idx, full_num, full_idx


def offset_causal(offset: torch.Tensor):
    """mask_mod: query ``q_idx`` (at position ``offset + q_idx``) sees keys up to its own position.

    Module-level factory: every call shares one code object and the offset is
    a tensor (an input of the compiled graph), so a new context length neither
    re-traces the mask nor compiles again.
    """

    def reconstruct_mask(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return reconstruct_mask


def _offset_causal_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: torch.Tensor,
                        kv_num: torch.Tensor, kv_idx: torch.Tensor, full_num: torch.Tensor, full_idx: torch.Tensor,
                        scaling: float, kernel_options: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One graph: the BlockMask and FlexAttention, on tensors padded to whole tiles (flat or split)."""
    if q.dim() == 5:
        q, k, v = (x.flatten(2, 3) for x in (q, k, v))
    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=KERNEL_BLOCK,
                                          mask_mod=offset_causal(offset), seq_lengths=(q.shape[2], k.shape[2]),
                                          compute_q_blocks=False)
    return with_lse(flex_attention, q, k, v, block_mask=block_mask, scale=scaling,
                    enable_gqa=q.shape[1] != k.shape[1], kernel_options=kernel_options)


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                       context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pass's causal attention on top of ``context`` keys: output (query dtype) and float32 lse.

    Compiled once for every length on CUDA (``compile.length_generic``), as the
    prefill: queries and keys are padded to whole tiles (split into tiles, so the
    symbolic lengths are visibly tile multiples and FlexAttention keeps its
    unmasked loads); padding queries come after the real ones and padding keys
    after every key a real query sees, and both are cut off the results.
    """
    lq = query.shape[2]
    lq_pad = whole_tiles(lq)
    lk_pad = whole_tiles(context + lq)
    split = query.is_cuda
    q, k, v = (tiled(x, n, split) for x, n in ((query, lq_pad), (key, lk_pad), (value, lk_pad)))
    args = (q, k, v, torch.tensor(context, device=query.device),
            *offset_causal_block_indices(context, lq_pad, lk_pad, query.device))
    # Eager on the CPU (Inductor's CPU FlexAttention has no log-sum-exp, torch 2.13: the tests' path) and
    # inside an outer torch.compile (it fuses into the caller's graph).
    attend = _offset_causal_flex
    if query.is_cuda and not torch.compiler.is_compiling():
        attend = length_generic(_offset_causal_flex, (0, 2), (1, 2), (2, 2), (4, 2), (5, 2), (5, 3), (6, 2), (7, 2),
                                (7, 3))
    out, lse = attend(*args, scaling, kernel_options_for(query.device) if query.is_cuda else None)
    return out[:, :, :lq], lse[:, :, :lq]


def fused_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, context: int,
               scored_from: int, reduce: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """``reconstruct.score_rows`` on this module's path (``supported`` must hold)."""
    if query.shape[2] == 0:  # no queries: FlexAttention takes no empty sequence
        bsz, hkv = key.shape[:2]
        return torch.empty_like(query), torch.zeros(bsz, hkv, context, dtype=torch.float32, device=query.device)
    out, lse = attention_with_lse(query, key, value, scaling, context)
    return out, launch_score(query, key, lse, scaling, context, scored_from, reduce)
