"""Compile ahead of the first request: ``warmup`` and the on-disk compile caches.

The prefill compiles two graphs (selection, packed attention) whose sequence
length is symbolic, so one warm-up serves every later prompt length
(``docs/serving.md``). ``warmup`` drives them with random tensors of the
model's attention shapes at a few lengths until a pass compiles nothing new,
and runs the pruned cache's decode kernels once, so the first real request
pays no compile. The compiled artifacts land in torch's own caches
(``TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_<user>``, Triton
kernels included), which a second process on the same machine reuses;
``save_compile_cache``/``load_compile_cache`` move them as one file.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from .attention import prefill_attention_op, tca_prefill_attention
from .cache import TCACacheLayer
from .integration import attention_modules, is_applied
from .layer import TCALayer, tca_layer
from .selection import Selection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmupReport:
    """What ``warmup`` compiled and what it cost.

    Attributes:
        lengths: prompt lengths driven through the prefill, in order.
        graphs: graphs dynamo compiled during the warm-up (0 when every
            graph came from this process's earlier use).
        seconds: wall time of the whole warm-up.
        per_length: seconds spent at each length (compiles included).
        compiled: names of the paths exercised.
    """

    lengths: tuple[int, ...]
    graphs: int
    seconds: float
    per_length: tuple[float, ...]
    compiled: tuple[str, ...] = field(default=("prefill selection", "prefill attention", "decode step"))

    def __str__(self) -> str:
        steps = ", ".join(f"{n}: {s:.1f} s" for n, s in zip(self.lengths, self.per_length, strict=True))
        return (f"tca_flex warm-up: {self.graphs} graph(s) compiled in {self.seconds:.1f} s "
                f"({', '.join(self.compiled)}; lengths {steps})")


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def warmup_lengths(window: int, max_length: int, block: int) -> list[int]:
    """Lengths the warm-up runs: a few spread over ``(window, max_length]``, none a tile multiple.

    The first one keeps every symbolic size at least 2 (dynamo specialises
    sizes 0 and 1, which would tie the graph to tiny prompts); the others
    check that nothing new compiles.
    """
    first = window + 4 * max(block, 128) + 37
    if first > max_length:
        raise ValueError(f"max_length={max_length} leaves no room above the window ({window}) for a sparse "
                         f"prefill of at least {first} tokens: prompts this short run dense and need no warm-up")
    middle = (first + max_length) // 2 | 1
    return sorted({first, middle, max_length - (1 if max_length % 128 == 0 else 0)})


def warmup(model: torch.nn.Module, max_length: int, *, dtype: torch.dtype | None = None,
           device: torch.device | str | None = None, batch_size: int = 1, decode: bool = True,
           progress: bool = True) -> WarmupReport:
    """Compile everything a server needs for prompts up to ``max_length`` tokens.

    Runs the TCA prefill of one attention layer (every layer shares its
    graphs) on random tensors of the model's shapes at a few lengths, then,
    with ``decode``, one ``TCACache`` decode step with a block compression.
    Later prompts of any length up to ``max_length`` reuse what it compiled.

    Args:
        model: a model prepared by ``tca_flex.apply``.
        max_length: the longest prompt to serve.
        dtype, device: what the model will run in (default: its parameters').
        batch_size: the batch size to serve (the graphs are specialised on it).
        decode: also warm the pruned cache's decode path.
        progress: show a progress bar (tqdm, if installed) over the lengths.

    Returns:
        A ``WarmupReport``; ``str(report)`` is a one-line summary.

    Raises:
        ValueError: the model was not prepared by ``tca_flex.apply``, or
            ``max_length`` leaves no room for a sparse prefill.
    """
    if not is_applied(model):
        raise ValueError("tca_flex.warmup: call tca_flex.apply(model) first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    param = next(model.parameters())
    dtype = dtype or param.dtype
    device = torch.device(device) if device is not None else param.device
    mod = attention_modules(model)[0]
    layer = tca_layer(mod)
    config = layer.config
    hkv = layer.cdf.shape[0]
    hq = hkv * (model.config.num_attention_heads // model.config.num_key_value_heads)
    d = mod.head_dim
    lengths = warmup_lengths(config.window, max_length, config.block_size)
    cdf = layer.cdf.to(device)
    start, before, per_length = time.perf_counter(), _graphs(), []
    bar = _progress(lengths, progress)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for length in bar:
            t0 = time.perf_counter()
            # Laid out as transformers' attention modules hand them over ([B, L, H, D]
            # projections, transposed): compiled graphs are specialised on strides.
            q, k, v = (torch.randn(batch_size, length, h, d, generator=gen, device=device, dtype=dtype)
                       .transpose(1, 2) for h in (hq, hkv, hkv))
            # Both ways in: the model's (the custom op, which runs below autograd, and
            # dynamo's guards see that dispatch state) and a direct call's.
            prefill_attention_op(q, k, v, cdf, layer.config_json, d ** -0.5)
            _, sel = tca_prefill_attention(q, k, v, cdf, config, d ** -0.5, return_selection=True)
            if decode:
                _decode_once(layer, k, v, sel, q.shape[1], d)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            per_length.append(time.perf_counter() - t0)
    report = WarmupReport(lengths=tuple(lengths), graphs=_graphs() - before,
                          seconds=time.perf_counter() - start, per_length=tuple(per_length),
                          compiled=("prefill selection", "prefill attention") + (("decode step",) if decode else ()))
    logger.info("%s", report)
    return report


def _decode_once(layer: TCALayer, key: torch.Tensor, value: torch.Tensor, sel: Selection, hq: int, d: int) -> None:
    """A pruned cache filled from the prefill, then ``block_size`` decode steps (one compression)."""
    cache = TCACacheLayer(layer.config, layer.keep_per_block)
    cache.lazy_initialization(key, value)
    cache.finish_prefill(key, value, sel)
    for _ in range(layer.config.block_size):
        new_k = torch.randn_like(key[:, :, :1])
        cache.update(new_k, torch.randn_like(new_k))
        cache.decode_step(torch.randn(key.shape[0], hq, 1, d, device=key.device, dtype=key.dtype), d ** -0.5)


def _progress(lengths: list[int], show: bool):
    if not show:
        return lengths
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return lengths
    return tqdm(lengths, desc="tca_flex warm-up", unit="length")


def save_compile_cache(path: str | os.PathLike) -> Path:
    """Write this process's compiled artifacts (``torch.compiler.save_cache_artifacts``) to ``path``.

    Call after ``warmup``. Another process, or another machine with the same
    GPU, torch and Triton, calls ``load_compile_cache(path)`` before its first
    request and skips the compile. Without it, a second process on this
    machine still reuses torch's on-disk caches (``TORCHINDUCTOR_CACHE_DIR``).
    """
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("torch recorded no compile artifacts in this process: run tca_flex.warmup first")
    path = Path(path)
    path.write_bytes(saved[0])
    return path


def load_compile_cache(path: str | os.PathLike) -> None:
    """Load artifacts written by ``save_compile_cache`` (before the first request).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    data = Path(path).read_bytes()
    torch.compiler.load_cache_artifacts(data)
