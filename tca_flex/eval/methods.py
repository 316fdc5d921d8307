"""Method registry: name -> a function that prepares the model and returns a cleanup.

A ``Method`` is one point on an accuracy-vs-KV curve: ``family`` names the
curve (``dense``, ``tca``, ``streaming``, ``snapkv``) and ``level`` the
point. ``Method.prepare(model, length)`` changes the model in place and returns a
``Prepared`` whose ``cleanup()`` undoes it, so methods run one after another
on one loaded model.

TCA methods (``TCA_VARIANTS``): ``tca`` runs the path users run,
``tca_flex.apply`` (FlexAttention sparse prefill) and a real ``TCACache`` for
decode, which compresses every block that leaves the window; a
conversation's turns (``tasks.multi_turn``) are appended to that one cache
(``docs/chunked_prefill.md``), while ``tca_reprefill`` prefills the whole
conversation again into a fresh ``TCACache`` at every turn. ``tca_recon``
appends too, but selects the first prompt by reconstruction
(``reconstruct.prefill_by_reconstruction``; ``_mean``: mean instead of max
over the repeat pass, ``_head``: one quota per head instead of the per-block
ladder, ``_noprior``: the final window compressed by the usual rule). Labelled
baselines: ``tca_emulated`` (TCA's prefill, then decode over the kept set
fixed at the prefill, masked in a full ``DynamicCache``; ``baselines.TCAPolicy``),
``tca_prefill`` (sparse prefill, decode over the full cache), and with the
CLI's ``--tca-backend mask`` ``tca_mask`` / ``tca_prefill_mask`` (the same
as the emulation / the prefill alone with explicit-mask SDPA).

Budgets: ``tca`` uses ``HeadBudgets.uniform`` at keep fraction ``level``;
``tca_spread`` a log-Gaussian ladder with the same mean (``spread_budgets``);
``tca_file`` takes given (e.g. calibrated) budgets (the CLI's ``--budgets
FILE``: ``tca[FILE]``). The baselines get, per KV head, exactly as many
prompt tokens as TCA keeps on the same prompt length (``tca_kv_tokens``:
expected global subset + final window), so the curves compare at equal KV
budget. Every record names the cache class that decoded (``cache``). Dense
appends conversations to a ``DynamicCache`` (exactly a re-prefill); the
kept-set policies re-prefill, since their kept set is decided at a prefill.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import tca_flex

from ..budgets import HeadBudgets
from ..checks import check_choice
from ..config import TCAConfig
from ..integration import model_fingerprint
from ..selection import global_region_length
from .baselines import SnapKVPolicy, StreamingPolicy, TCAMaskPolicy, TCAPolicy
from .install import install_policy, kept_fraction


@dataclass(frozen=True)
class Prepared:
    """A prepared model's handles.

    Attributes:
        cleanup: restores the model.
        kept_fraction: fraction of prompt KV kept after the last prefill
            (None: measured on the decode cache, 1.0 for a full cache).
        make_cache: optional factory of the decode cache (None: the model's
            default, a DynamicCache).
        on_prompt: optional hook called with each prompt's length before its
            prefill (budgets that depend on the exact length).
        conversation: how later turns of a conversation reach the model:
            ``"append"`` (on top of one cache) or ``"reprefill"`` (the whole
            conversation from a fresh cache at every turn).
        prefill: optional ``(model, input_ids, cache, tokenizer) -> [1, V]``
            last-position logits: fills the empty cache in place of the
            model's own prefill (the first turn of a conversation, a
            single-turn prompt).
    """

    cleanup: Callable[[], None]
    kept_fraction: Callable[[], float | None] = lambda: None
    make_cache: Callable[[], Any] | None = None
    on_prompt: Callable[[int], None] | None = None
    conversation: str = "reprefill"
    prefill: Callable[..., torch.Tensor] | None = None


@dataclass(frozen=True)
class Method:
    """One evaluated configuration."""

    name: str
    family: str
    level: float | None
    prepare: Callable[[torch.nn.Module, int], Prepared]
    # A kvpress press for a prompt length (kvpress methods only): lets the
    # runner share one dense prefill among dense and the presses (shared.py).
    press: Callable[[int], Any] | None = None


def model_shape(model: torch.nn.Module) -> tuple[int, int]:
    """``(num_layers, num_kv_heads)`` of a transformers decoder."""
    fingerprint = model_fingerprint(model)
    return fingerprint["num_layers"], fingerprint["num_kv_heads"]


def tca_kv_tokens(length: int, per_block: float, config: TCAConfig) -> int:
    """Prompt tokens one KV head keeps under TCA: expected global subset + final window.

    Args:
        length: prompt length ``L``.
        per_block: expected tokens kept per full block, ``E[k]`` (0..b).
        config: block size and window.
    """
    global_len = global_region_length(length, config.window)
    if length <= config.dense_up_to:
        return length
    b = config.block_size
    sizes = [min(b, global_len - s) for s in range(0, global_len, b)]
    return int(round(sum(min(per_block, s) for s in sizes))) + config.window


def dense() -> Method:
    """The unmodified model (its own SDPA attention)."""
    return Method("dense", "dense", 1.0, lambda model, length: Prepared(cleanup=lambda: None,
                                                                       conversation="append"))


def _real_prepare(model: torch.nn.Module, budgets: HeadBudgets, conversation: str) -> Prepared:
    """The shipped path: ``tca_flex.apply`` (FlexAttention sparse prefill) and a real ``TCACache``.

    The KV kept fraction is measured on the cache after each prefill (``runner.cache_kept_fraction``).
    """
    tca_flex.apply(model, budgets=budgets)
    return Prepared(cleanup=lambda: tca_flex.remove(model), make_cache=lambda: tca_flex.TCACache(model),
                    conversation=conversation)


# The instruction of the repeat pass that scores a prompt by reconstruction (``tca_recon``).
REPEAT_PROMPT = "\nUser: Repeat the previous text word for word.\nAssistant:"


def _recon_prepare(model: torch.nn.Module, budgets: HeadBudgets, reduce: str = "max",
                   prompt: str = REPEAT_PROMPT, quota: str = "blocks", window_prior: bool = True) -> Prepared:
    """The shipped path, but the first prefill of a conversation keeps what repeating the prompt reads.

    ``reconstruct.prefill_by_reconstruction``: TCA's prefill into a full cache,
    a teacher-forced pass of ``prompt`` + the prompt scores every position,
    TCA's per-block budgets select from that score; later turns append.
    """
    from ..reconstruct import prefill_by_reconstruction

    tca_flex.apply(model, budgets=budgets)

    def prefill(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any, tokenizer: Any) -> torch.Tensor:
        ids = torch.tensor([tokenizer(prompt).input_ids], dtype=torch.long, device=input_ids.device)
        return prefill_by_reconstruction(model, input_ids, cache, ids, reduce=reduce, quota=quota,
                                         window_prior=window_prior)

    return Prepared(cleanup=lambda: tca_flex.remove(model), make_cache=lambda: tca_flex.TCACache(model),
                    conversation="append", prefill=prefill)


def _emulated_prepare(model: torch.nn.Module, budgets: HeadBudgets) -> Prepared:
    """Baseline: TCA's prefill, then decode over its kept set masked in a full ``DynamicCache``.

    The kept set (global subset + final window) is fixed at the prefill; the
    ``TCACache`` instead compresses each block that leaves the window during decode.
    """
    tca_flex.apply(model, budgets=budgets)
    uninstall = install_policy(model, lambda layer: TCAPolicy())

    def cleanup() -> None:
        uninstall()
        tca_flex.remove(model)

    return Prepared(cleanup=cleanup, kept_fraction=lambda: kept_fraction(model))


def _prefill_prepare(model: torch.nn.Module, budgets: HeadBudgets) -> Prepared:
    tca_flex.apply(model, budgets=budgets)
    return Prepared(cleanup=lambda: tca_flex.remove(model))


def _mask_prepare(model: torch.nn.Module, budgets: HeadBudgets, pruned: bool) -> Prepared:
    device = next(model.parameters()).device
    uninstall = install_policy(model, lambda layer: TCAMaskPolicy(budgets.config, budgets.cdf(layer).to(device),
                                                                  pruned))
    return Prepared(cleanup=uninstall, kept_fraction=lambda: kept_fraction(model) if pruned else None)


# TCA variant -> how it prepares a model for given budgets. Each is a method family
# (``tca-k0.25``, ``tca[FILE]``, ...); EVALUATION.md's table says what each runs.
TCA_VARIANTS: dict[str, Callable[[torch.nn.Module, HeadBudgets], Prepared]] = {
    # The shipped path: sparse prefill, real TCACache; a conversation's turns are appended to it.
    "tca": functools.partial(_real_prepare, conversation="append"),
    # The same, but every turn prefills the whole conversation again into a fresh TCACache.
    "tca_reprefill": functools.partial(_real_prepare, conversation="reprefill"),
    # Appending, with the first prefill scored by a pass that repeats the prompt (reconstruct.py).
    "tca_recon": _recon_prepare,
    "tca_recon_mean": functools.partial(_recon_prepare, reduce="mean"),
    "tca_recon_head": functools.partial(_recon_prepare, quota="head"),
    # The final window of the first prompt compressed by the usual chunk rule, not by the reconstruction.
    "tca_recon_noprior": functools.partial(_recon_prepare, window_prior=False),
    # Labelled baselines: the kept-set emulation (DynamicCache), the sparse prefill alone
    # (full DynamicCache), and both with explicit-mask SDPA instead of FlexAttention.
    "tca_emulated": _emulated_prepare,
    "tca_prefill": _prefill_prepare,
    "tca_mask": functools.partial(_mask_prepare, pruned=True),
    "tca_prefill_mask": functools.partial(_mask_prepare, pruned=False),
}


def tca_uniform(variant: str, keep: float, config: TCAConfig, budgets: Callable[..., HeadBudgets] | None = None,
                family: str | None = None) -> Method:
    """TCA ``variant`` (``TCA_VARIANTS``) with budgets built for the model: uniform ``keep`` by default.

    Args:
        budgets: ``(num_layers, num_kv_heads, keep, config) -> HeadBudgets`` (default ``HeadBudgets.uniform``).
        family: the method's family name (default ``variant``).
    """
    make = budgets or HeadBudgets.uniform
    family = family or variant

    def prepare(model: torch.nn.Module, length: int) -> Prepared:
        return TCA_VARIANTS[variant](model, make(*model_shape(model), keep, config))

    return Method(f"{family}-k{keep:g}", family, keep, prepare)


def tca_file(variant: str, budgets: HeadBudgets, label: str) -> Method:
    """TCA ``variant`` with given (e.g. calibrated) budgets: ``variant[label]``, level = their mean keep."""
    return Method(f"{variant}[{label}]", f"{variant}_budgets", mean_keep(budgets),
                  lambda model, length: TCA_VARIANTS[variant](model, budgets))


def tca(keep: float, config: TCAConfig) -> Method:
    """The shipped path with uniform budgets: every head keeps ``keep`` of each global block."""
    return tca_uniform("tca", keep, config)


def spread_budgets(num_layers: int, num_kv_heads: int, keep: float, config: TCAConfig,
                   sigma: float = 1.0) -> HeadBudgets:
    """Uncalibrated, non-uniform budgets: a discretised log-Gaussian with mean ``keep * b``.

    ``p(k) ~ exp(-(ln(k + 1) - mu)^2 / (2 sigma^2))`` over ``k in {0..b}``, with
    ``mu`` found by bisection so that ``E[k] = keep * b`` (the same KV budget
    as ``HeadBudgets.uniform``). Unlike uniform budgets, the per-rank ladder
    ``Psi`` then gives high-scoring blocks more tokens than low-scoring ones,
    so TCA's block ranking matters. A stand-in until calibrated budgets land.
    """
    b = config.block_size
    log_k = torch.log(torch.arange(b + 1, dtype=torch.float64) + 1.0)
    k = torch.arange(b + 1, dtype=torch.float64)

    def dist(mu: float) -> torch.Tensor:
        w = torch.exp(-(log_k - mu) ** 2 / (2 * sigma**2))
        return w / w.sum()

    lo, hi = -10.0, float(log_k[-1]) + 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((dist(mid) * k).sum()) < keep * b else (lo, mid)
    row = dist((lo + hi) / 2)
    return HeadBudgets(probs=row.expand(num_layers, num_kv_heads, b + 1).clone(), config=config)


def tca_spread(keep: float, config: TCAConfig, sigma: float = 1.0) -> Method:
    """The shipped path with ``spread_budgets`` (same expected KV as ``tca(keep)``, ranked blocks)."""
    return tca_uniform("tca", keep, config, functools.partial(spread_budgets, sigma=sigma), family="tca_spread")


TCA_BACKENDS = ("flex", "mask")


def _check_backend(backend: str) -> None:
    check_choice("TCA backend", backend, TCA_BACKENDS)


def tca_budgets(budgets: HeadBudgets, label: str, backend: str = "flex") -> Method:
    """TCA with given (e.g. calibrated) budgets: ``tca[label]``, the shipped path.

    The CLI's ``--budgets FILE`` loads files with ``HeadBudgets.load`` and
    adds the baselines at the same mean keep fraction, i.e. the same expected
    KV budget. ``backend="mask"`` gives ``tca_mask[label]`` instead: the same
    selection with explicit-mask SDPA (``TCAMaskPolicy``) and the kept-set
    emulation over a ``DynamicCache`` (no FlexAttention, no ``TCACache``;
    timings not TCA's).
    """
    _check_backend(backend)
    return tca_file("tca" if backend == "flex" else "tca_mask", budgets, label)


def tca_budgets_prefill(budgets: HeadBudgets, label: str, backend: str = "flex") -> Method:
    """TCA prefill with given budgets, decode over the full cache (``tca_prefill[label]``).

    Paired with ``tca_budgets`` it splits a calibrated configuration's loss
    into the sparse prefill's share and the pruned cache's share.
    ``backend="mask"``: ``tca_prefill_mask[label]``, the same with explicit-mask SDPA.
    """
    _check_backend(backend)
    return tca_file("tca_prefill" if backend == "flex" else "tca_prefill_mask", budgets, label)


def mean_keep(budgets: HeadBudgets) -> float:
    """Mean over layers and KV heads of the expected per-block keep fraction."""
    return float(budgets.keep_fraction().mean())


def _policy_method(name: str, family: str, keep: float, config: TCAConfig,
                   make: Callable[[Callable[[int], int]], Any]) -> Method:
    per_block = keep * config.block_size

    def budget(length: int) -> int:
        return tca_kv_tokens(length, per_block, config)

    def prepare(model: torch.nn.Module, length: int) -> Prepared:
        uninstall = install_policy(model, lambda layer: make(budget))
        return Prepared(cleanup=uninstall, kept_fraction=lambda: kept_fraction(model))

    return Method(name, family, keep, prepare)


def streaming(keep: float, config: TCAConfig, sinks: int = 4) -> Method:
    """StreamingLLM at the KV budget of ``tca(keep, config)``."""
    return _policy_method(f"streaming-k{keep:g}", "streaming", keep, config,
                          lambda budget: StreamingPolicy(budget, sinks))


def snapkv(keep: float, config: TCAConfig, obs: int = 32, kernel: int = 7) -> Method:
    """SnapKV-style compression at the KV budget of ``tca(keep, config)``."""
    return _policy_method(f"snapkv-k{keep:g}", "snapkv", keep, config,
                          lambda budget: SnapKVPolicy(budget, obs, kernel))


def kvpress(press: str, keep: float, config: TCAConfig, suffix: str = "", **press_kwargs: Any) -> Method:
    """A press of NVIDIA's ``kvpress`` package at the KV budget of ``tca(keep, config)``.

    ``press`` is a class name such as ``SnapKVPress``; its ``compression_ratio``
    is ``1 - tca_kv_tokens(L) / L``, set for every prompt length ``L``;
    ``press_kwargs`` go to its constructor and ``suffix`` names that variant.
    kvpress 0.5.x needs transformers < 5.3: run from a separate virtual
    environment (see EVALUATION.md). The press compresses the cache after a
    dense prefill; the kept fraction is measured on the cache.
    """

    def ratio(n: int) -> float:
        return max(0.0, 1.0 - tca_kv_tokens(n, keep * config.block_size, config) / n)

    def make(n: int) -> Any:
        import kvpress as kvp

        return getattr(kvp, press)(compression_ratio=ratio(n), **press_kwargs)

    def prepare(model: torch.nn.Module, length: int) -> Prepared:
        instance = make(length)
        context = instance(model)
        context.__enter__()

        def on_prompt(n: int) -> None:
            instance.compression_ratio = ratio(n)

        return Prepared(cleanup=lambda: context.__exit__(None, None, None), on_prompt=on_prompt)

    return Method(f"kvpress:{press}{suffix}-k{keep:g}", f"kvpress:{press}{suffix}", keep, prepare, make)


# family -> factory(level, config). Levels are keep fractions; a calibrated
# TCA family would take tau as its level (see the module docstring).
FAMILIES: dict[str, Callable[[float, TCAConfig], Method]] = {
    "tca": tca,
    "tca_spread": tca_spread,
    "tca_reprefill": functools.partial(tca_uniform, "tca_reprefill"),
    "tca_recon": functools.partial(tca_uniform, "tca_recon"),
    "tca_recon_mean": functools.partial(tca_uniform, "tca_recon_mean"),
    "tca_recon_head": functools.partial(tca_uniform, "tca_recon_head"),
    "tca_recon_noprior": functools.partial(tca_uniform, "tca_recon_noprior"),
    "tca_emulated": functools.partial(tca_uniform, "tca_emulated"),
    "tca_prefill": functools.partial(tca_uniform, "tca_prefill"),
    "streaming": streaming,
    "snapkv": snapkv,
    "kvpress:SnapKVPress": lambda keep, config: kvpress("SnapKVPress", keep, config),
    # kvpress's SnapKV with the in-library baseline's settings (its default window is 64).
    "kvpress:SnapKVPress-w32k7": lambda keep, config: kvpress("SnapKVPress", keep, config, "-w32k7",
                                                             window_size=32, kernel_size=7),
    "kvpress:StreamingLLMPress": lambda keep, config: kvpress("StreamingLLMPress", keep, config),
    "kvpress:ExpectedAttentionPress": lambda keep, config: kvpress("ExpectedAttentionPress", keep, config),
    "kvpress:TOVAPress": lambda keep, config: kvpress("TOVAPress", keep, config),
    "kvpress:KnormPress": lambda keep, config: kvpress("KnormPress", keep, config),
    "kvpress:PyramidKVPress": lambda keep, config: kvpress("PyramidKVPress", keep, config),
    # PyramidKV (per-layer budgets, SnapKV scores) with the in-library SnapKV's window and kernel.
    "kvpress:PyramidKVPress-w32k7": lambda keep, config: kvpress("PyramidKVPress", keep, config, "-w32k7",
                                                                window_size=32, kernel_size=7),
}


def build_methods(families: list[str], levels: list[float], config: TCAConfig) -> list[Method]:
    """``dense`` (when listed) plus every sparse family at every level."""
    unknown = sorted(set(families) - set(FAMILIES) - {"dense"})
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {['dense', *FAMILIES]}")
    methods = [dense()] if "dense" in families else []
    for family in families:
        if family != "dense":
            methods.extend(FAMILIES[family](level, config) for level in levels)
    return methods
