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
from typing import Any

import torch
from torch._dynamo.utils import counters

from .attention import SUPPORTED_DTYPES, prefill_attention_op, tca_prefill_attention
from .cache import TCACache, TCACacheLayer
from .hfcompat import cache_kwargs
from .integration import TCA_LENGTH_SOURCE, attention_modules, is_applied
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
        generate_seconds: of ``seconds``, the time spent warming ``generate``'s
            compiled decode step (0 without ``generate=True``).
    """

    lengths: tuple[int, ...]
    graphs: int
    seconds: float
    per_length: tuple[float, ...]
    compiled: tuple[str, ...] = field(default=("prefill selection", "prefill attention", "decode step"))
    generate_seconds: float = 0.0

    def __str__(self) -> str:
        steps = ", ".join(f"{n}: {s:.1f} s" for n, s in zip(self.lengths, self.per_length, strict=True))
        return (f"tca_flex warm-up: {self.graphs} graph(s) compiled in {self.seconds:.1f} s; ran "
                f"{', '.join(self.compiled)} at lengths {steps}")


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def min_warmup_length(window: int, block: int) -> int:
    """The shortest prompt the warm-up runs (``warmup_lengths``' first): ``max_length`` must reach it."""
    return window + 4 * max(block, 128) + 37


def warmup_lengths(window: int, max_length: int, block: int) -> list[int]:
    """Lengths the warm-up runs: a few spread over ``(window, max_length]``, none a tile multiple.

    The first one keeps every symbolic size at least 2 (dynamo specialises
    sizes 0 and 1, which would tie the graph to tiny prompts); the others
    check that nothing new compiles.
    """
    first = min_warmup_length(window, block)
    if first > max_length:
        raise ValueError(f"max_length={max_length} leaves no room above the window ({window}) for the warm-up's "
                         f"shortest prefill ({first} tokens, every symbolic size at least 2): warm up with "
                         f"max_length >= {first}; sparse prompts shorter than that may compile at their first "
                         "request")
    middle = (first + max_length) // 2 | 1
    return sorted({first, middle, max_length - (1 if max_length % 128 == 0 else 0)})


def warmup(model: torch.nn.Module, max_length: int, *, dtype: torch.dtype | None = None,
           device: torch.device | str | None = None, batch_size: int = 1, decode: bool = True,
           generate: bool = False, compile_config: Any = None, progress: bool = True) -> WarmupReport:
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
        generate: also compile the decode step that ``model.generate`` compiles
            by itself over a ``TCACache(model, reserve_tokens=N)`` (transformers'
            auto-compile): one compile, its sizes symbolic, during two short
            generations at two prompt lengths; no later request, of any length,
            reserve or number of new tokens, compiles it again (each new cache
            still records its CUDA graphs). Runs the whole model.
        compile_config: the ``transformers.CompileConfig`` your ``generate``
            calls will pass (default: the model's ``generation_config``'s, as
            ``generate`` does); ``generate`` keeps one compiled step per config.
        progress: show a progress bar (tqdm, if installed) over the lengths.

    Returns:
        A ``WarmupReport``; ``str(report)`` is a one-line summary.

    Raises:
        ValueError: the model was not prepared by ``tca_flex.apply``,
            ``max_length`` leaves no room for a sparse prefill, or ``generate``
            was asked where transformers' ``generate`` compiles nothing (on the
            CPU without a ``compile_config`` that forces it, or with
            ``disable_compile=True`` in the model's generation config).
    """
    if not is_applied(model):
        raise ValueError("tca_flex.warmup: call tca_flex.apply(model) first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    param = next(model.parameters())
    dtype = dtype or param.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"tca_flex.warmup: dtype {dtype} is not one TCA runs in "
                        f"({[str(t) for t in SUPPORTED_DTYPES]}); pass the dtype the model will run in")
    device = torch.device(device) if device is not None else param.device
    mod = attention_modules(model)[0]
    layer = tca_layer(mod)
    config = layer.config
    hkv = layer.cdf.shape[0]
    hq = hkv * (model.config.num_attention_heads // model.config.num_key_value_heads)
    d = mod.head_dim
    # The scale the model's layers pass (Granite's attention_multiplier is not head_dim ** -0.5): graphs
    # warmed with another float could be specialised on it.
    scale = getattr(mod, "scaling", None) or d ** -0.5
    lengths = warmup_lengths(config.window, max_length, config.block_size)
    if generate:
        _check_generate_compiles(model, device, compile_config)
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
            prefill_attention_op(q, k, v, cdf, layer.config_json, scale)
            _, sel = tca_prefill_attention(q, k, v, cdf, config, scale, return_selection=True)
            if decode:
                _decode_once(layer, k, v, sel, q.shape[1], scale)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            per_length.append(time.perf_counter() - t0)
        generate_seconds = 0.0
        if generate:
            t0 = time.perf_counter()
            _generate_twice(model, lengths[0], min(lengths[0] + 2 * config.block_size + 17, max_length),
                            batch_size, device, compile_config)
            generate_seconds = time.perf_counter() - t0
    report = WarmupReport(lengths=tuple(lengths), graphs=_graphs() - before,
                          seconds=time.perf_counter() - start, per_length=tuple(per_length),
                          compiled=("prefill selection", "prefill attention") + (("decode step",) if decode else ())
                          + (("generate's compiled decode step",) if generate else ()),
                          generate_seconds=generate_seconds)
    logger.info("%s", report)
    return report


def _decode_once(layer: TCALayer, key: torch.Tensor, value: torch.Tensor, sel: Selection, hq: int,
                 scale: float) -> None:
    """A pruned cache filled from the prefill, then ``block_size`` decode steps (one compression)."""
    cache = TCACacheLayer(layer.config, layer.keep_per_block)
    cache.lazy_initialization(key, value)
    cache.finish_prefill(key, value, sel)
    for _ in range(layer.config.block_size):
        new_k = torch.randn_like(key[:, :, :1])
        cache.update(new_k, torch.randn_like(new_k))
        cache.decode_step(torch.randn(key.shape[0], hq, 1, key.shape[-1], device=key.device, dtype=key.dtype), scale)


def _check_generate_compiles(model: torch.nn.Module, device: torch.device, compile_config: Any) -> None:
    """Refuse ``generate=True`` where transformers' ``generate`` would not compile: nothing to warm."""
    config = getattr(model, "generation_config", None)
    if config is None or not hasattr(model, "generate"):
        raise ValueError("tca_flex.warmup(generate=True) needs a transformers model with generate()")
    if config.disable_compile:
        raise ValueError("tca_flex.warmup(generate=True): the model's generation_config has disable_compile=True, "
                         "so generate compiles nothing; drop generate=True or re-enable compiling")
    chosen = compile_config or config.compile_config
    if device.type == "cpu" and not (chosen is not None and chosen._compile_all_devices):
        raise ValueError("tca_flex.warmup(generate=True): transformers' generate compiles its decode step on "
                         "accelerators only, so on the CPU there is nothing to warm; run on the GPU, or pass the "
                         "compile_config (with _compile_all_devices=True) that your generate calls use")


# The attention mask ``generate`` passes to the compiled step, as dynamo names it.
_MASK_SOURCE = r".*\['attention_mask'\]$"


def _generate_twice(model: torch.nn.Module, first: int, second: int, batch_size: int, device: torch.device,
                    compile_config: Any) -> None:
    """Two greedy generations of 3 tokens over ``TCACache(reserve_tokens=...)`` at two prompt lengths.

    Left to itself, generate compiles its step at the first decode step with
    every size specialised, again at the second (the token count turns
    symbolic) and once more at the second prompt length (the slot count
    turns symbolic). Here the first compile takes them symbolic; the second
    generation checks that nothing compiles again.
    """
    gen = torch.Generator(device=device).manual_seed(1)
    vocab = model.config.vocab_size
    pad = model.generation_config.pad_token_id
    # None would replace the generation_config's own compile_config: pass only a given one.
    given = {"compile_config": compile_config} if compile_config is not None else {}
    # The cache's token counts and its layout's slot counts (the decode kernels' grid sizes)
    # symbolic from the first compile (its buffers' slot dims are marked by the cache itself),
    # and the mask generate hands the step (none over a TCACache: generate_hook; a generate
    # that does not say a step is its loop's would hand a 4-D one, as long as the tokens seen):
    # one compile instead of three. Patched for these calls only: the
    # compiled step keeps its symbolic sizes, and no setting outlives the warm-up.
    sources = ",".join(filter(None, (torch.compiler.config.dynamic_sources, TCA_LENGTH_SOURCE, _MASK_SOURCE)))
    with torch.compiler.config.patch(dynamic_sources=sources):
        for n in (first, second if second != first else first + 1):
            ids = torch.randint(1, vocab, (batch_size, n), generator=gen, device=device)
            cache = TCACache(model, reserve_tokens=16)
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                           do_sample=False, pad_token_id=0 if pad is None else pad, **given,
                           **cache_kwargs(model, cache))


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
    if torch.compiler.load_cache_artifacts(data) is None:
        # torch logs its own reason; say what it means for the requests.
        logger.warning("tca_flex.load_compile_cache: nothing was loaded from %s (empty, damaged, or written by "
                       "another torch version): the first request compiles as without it", path)
