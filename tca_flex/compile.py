"""torch.compile integration: the compiled graphs of the prefill, created once per process.

Compile once, serve any prompt length: the prefill's two graphs (selection,
packed attention) are compiled with the sequence length as a *symbolic* size
(``length_generic``), so every later prompt length reuses them; nothing here
specialises on a Python int derived from the length (``docs/serving.md``).
Outside an outer ``torch.compile`` we call these compiled copies (eager
``flex_attention`` would materialise the full score matrix); inside one we
call the raw functions and let the outer compile fuse them, as transformers'
own ``WrappedFlexAttention`` does. Nothing here changes torch globals at import
or on first use (the prefill's calls raise dynamo's recompile limit for their
own duration only).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

from .checks import check_choice

# Dynamo's recompile limit inside the prefill's compiled calls, and what
# ``tca_flex.compile`` (integration.py) raises it to for the process (on request
# only): a compiled *whole model* still re-traces its decode step when a TCACache grows.
MIN_RECOMPILE_LIMIT = 64

_compiled_flex: dict[bool | None, Any] = {}
_length_generic: dict[Callable[..., Any], Callable[..., Any]] = {}


def compiled_flex_attention(dynamic: bool | None = None) -> Any:
    """A process-wide compiled ``flex_attention`` (created on first use).

    ``dynamic=None`` (default) is torch's automatic dynamic shapes: a second
    distinct length recompiles once as symbolic, then no more. ``False``
    compiles per shape (benchmarks of one fixed shape).
    """
    if dynamic not in _compiled_flex:
        _compiled_flex[dynamic] = torch.compile(flex_attention, dynamic=dynamic)
    return _compiled_flex[dynamic]


def with_lse(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` (``flex_attention`` or a compiled copy) called for its output and log-sum-exp.

    Through ``return_aux``: ``return_lse`` is deprecated (torch >= 2.9) and its
    warn-once check is a dynamo guard, so a compiled caller compiled a second
    time at its second call.
    """
    out, aux = fn(*args, return_aux=AuxRequest(lse=True), **kwargs)
    return out, aux.lse


def output_and_lse_if(return_lse: bool, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``with_lse(fn, ...)`` if ``return_lse``, else ``fn(...)``'s output alone."""
    return with_lse(fn, *args, **kwargs) if return_lse else fn(*args, **kwargs)


def length_generic(fn: Callable[..., Any], *dims: tuple[int, int]) -> Callable[..., Any]:
    """``fn`` compiled once (``fullgraph=True``), with ``dims`` symbolic on every call.

    Each ``(argument index, dimension)`` in ``dims`` is marked dynamic before
    the call, so the first call compiles a graph for any size of those
    dimensions and later sizes reuse it (a size of 0 or 1 is left static: one
    more graph for it). Other shapes, dtypes and Python arguments (the config's
    knobs) stay static: they do not change per request.
    """
    compiled_fn = _length_generic.get(fn)
    if compiled_fn is None:
        compiled_fn = _length_generic[fn] = torch.compile(fn, fullgraph=True, dynamic=False)

    def call(*args: Any) -> Any:
        args = list(args)
        # Mark an alias (same storage, new tensor object): the caller's own tensor stays
        # unmarked, so passing it to another compiled function later is unaffected. One alias
        # per argument: a second one would drop the marks of the argument's earlier dims.
        for index in {index for index, _ in dims}:
            args[index] = args[index].detach()
        for index, dim in dims:
            # Dynamo specialises sizes 0 and 1 (a mark there is refused): e.g. a chunk of one tile.
            if args[index].shape[dim] > 1:
                torch._dynamo.mark_dynamic(args[index], dim)
        # One graph per static signature (batch size, heads, dtype, config), not per length;
        # a process that serves several models or configs (an evaluation, a test suite) can
        # pass dynamo's default 8 entries and would silently fall back to eager FlexAttention.
        # The higher limit holds only during this call.
        with torch._dynamo.config.patch(recompile_limit=MIN_RECOMPILE_LIMIT):
            return compiled_fn(*args)

    return call


def kernel_options_for(device: torch.device) -> dict[str, Any] | None:
    """Kernel options for ``device``; ``None`` keeps FlexAttention's defaults.

    On Hopper (compute capability 9.x) the tensor-memory-accelerator loads
    (``USE_TMA``) made TCA prefill attention 6-7% faster at 32K-128K on an H100
    (BENCHMARKS.md, 2026-11-24); elsewhere the defaults stand.
    """
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return {"USE_TMA": True}
    return None


# FlexAttention backends of the sparse prefill. "flash" is FlexAttention's FLASH backend,
# FlashAttention-4's CuTe-DSL kernels (the optional extra ``tca_flex[fa4]``); "triton" its
# default Triton kernel; "auto" takes FLASH on Hopper when the extra is installed, where it
# measured faster (BENCHMARKS.md), else Triton.
PREFILL_BACKENDS = ("auto", "triton", "flash")
PREFILL_BACKEND_ENV = "TCA_FLEX_PREFILL_BACKEND"


@functools.cache
def flash_available() -> bool:
    """Whether FlashAttention-4's CuTe-DSL package (``flash_attn.cute``) is importable."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ModuleNotFoundError:
        return False


def prefill_backend(device: torch.device, backend: str | None = None) -> str:
    """The FlexAttention backend the sparse prefill runs on ``device``: ``"triton"`` or ``"flash"``.

    ``backend`` defaults to the environment variable ``TCA_FLEX_PREFILL_BACKEND``
    (``auto`` if unset). Asking for ``flash`` where it cannot run is an error,
    never a silent fallback.
    """
    backend = backend or os.environ.get(PREFILL_BACKEND_ENV, "auto")
    check_choice("prefill backend", backend, PREFILL_BACKENDS, hint=f"(from {PREFILL_BACKEND_ENV} or the argument)")
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    if backend == "flash" and not (hopper and flash_available()):
        raise RuntimeError("the FLASH prefill backend needs an NVIDIA Hopper GPU (H100/H200) and FlashAttention-4: "
                           "pip install 'tca_flex[fa4]'; or set TCA_FLEX_PREFILL_BACKEND=triton (or auto)")
    if backend == "auto":
        backend = "flash" if hopper and flash_available() else "triton"
    return backend


def prefill_kernel_options(device: torch.device, backend: str | None = None) -> dict[str, Any] | None:
    """FlexAttention ``kernel_options`` of the sparse prefill (``prefill_backend``)."""
    if prefill_backend(device, backend) == "flash":
        return {"BACKEND": "FLASH"}
    return kernel_options_for(device)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, *, scale: float,
         enable_gqa: bool, return_lse: bool = False, kernel_options: dict[str, Any] | None = None,
         dynamic: bool | None = None) -> Any:
    """FlexAttention that is compiled whether or not the caller is.

    Shapes: q ``[B, H_q, Lq, D]``, k/v ``[B, H_kv, Lk, D]``. ``kernel_options``
    defaults to ``kernel_options_for(q.device)``; ``dynamic`` as in
    ``compiled_flex_attention``.
    """
    fn = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention(dynamic)
    options = kernel_options if kernel_options is not None else kernel_options_for(q.device)
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, kernel_options=options)
    return output_and_lse_if(return_lse, fn, q, k, v, **kwargs)
