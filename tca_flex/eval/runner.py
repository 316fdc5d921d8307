"""Run the suite: every method on the same prompts and the same model.

``run_suite`` returns flat records (one per sample and method), which
``report.py`` aggregates. Prompts are generated once per length and seed and
shared by all methods; a method is prepared once per length, run on every
sample, then cleaned up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..hfcompat import cache_kwargs, output_cache
from .methods import Method, Prepared
from .perplexity import bucket_nll, bucket_sizes, natural_text, perplexity, text_window
from .tasks import TASKS, Sample, count_tokens, score, score_fraction

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuiteConfig:
    """What to run.

    Attributes:
        lengths: context lengths in tokens (prompts are a little shorter, so
            that prompt + answer fit).
        tasks: task names from ``tasks.TASKS``.
        samples: samples per task and length (seeds ``seed .. seed + samples - 1``).
        seed: base seed.
        ppl_samples: perplexity windows per length (0: skip perplexity).
        ppl_source: ``perplexity.SOURCES`` entry.
        bucket: perplexity bucket in tokens.
        progress: show tqdm progress bars.
        gamma_queries: with TCA methods, attach to each sample the dropped
            attention mass of its prefill (``tca_flex.report`` over this many
            evenly spaced queries; 0: off). Costs one extra prefill per sample.
        share_prefill: dense and the kvpress methods run on one dense prefill
            per sample (``shared.py``; same answers, a fraction of the time).
    """

    lengths: tuple[int, ...] = (2048, 4096, 8192)
    tasks: tuple[str, ...] = tuple(TASKS)
    samples: int = 5
    seed: int = 0
    ppl_samples: int = 1
    ppl_source: str = "pydoc"
    bucket: int = 1024
    progress: bool = True
    gamma_queries: int = 0
    share_prefill: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {list(TASKS)}")
        if self.samples < 0 or self.ppl_samples < 0:
            raise ValueError("samples and ppl_samples must be >= 0")


def prompt_budget(length: int, max_new_tokens: int) -> int:
    """Prompt tokens to ask a generator for so that prompt + answer fit ``length``."""
    return max(16, length - length // 32 - max_new_tokens)


def shortest_context(tokenizer, tasks: Iterable[str], seeds: Iterable[int]) -> tuple[int, str]:
    """``(tokens, task)``: the shortest context every sample fits, and the task that needs it.

    A generator asked for fewer tokens still writes its header, needles,
    question and one filler; that prompt plus ``max_new_tokens`` is the least
    a length can mean. Shorter lengths would run longer prompts under their name.
    """
    need = (0, "")
    seeds = list(seeds)
    for name in tasks:
        for seed in seeds:
            sample = TASKS[name](tokenizer, 1, seed)
            need = max(need, (count_tokens(tokenizer, sample.prompt) + sample.max_new_tokens, name))
    return need


def make_samples(tokenizer, cfg: SuiteConfig, length: int) -> list[Sample]:
    """All task samples of one length; task ``t``'s sample ``i`` uses seed ``cfg.seed + i``."""
    out = []
    for name in cfg.tasks:
        probe = TASKS[name](tokenizer, 64, cfg.seed)
        out.extend(replace(TASKS[name](tokenizer, prompt_budget(length, probe.max_new_tokens), cfg.seed + i),
                           seed=cfg.seed + i)
                   for i in range(cfg.samples))
    return out


def _encode(tokenizer, text: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([tokenizer(text).input_ids], dtype=torch.long, device=device)


def cache_kept_fraction(cache: Any, prompt_len: int) -> float | None:
    """Physical KV length / prompt length, averaged over layers and KV heads (None: unknown cache).

    A ``TCACache`` counts the entries it holds (``memory_report``); other caches
    the length of their key tensors.
    """
    if hasattr(cache, "memory_report"):
        total = cache.memory_report().total
        return total.kept_fraction * cache.get_seq_length() / prompt_len
    layers = getattr(cache, "layers", None)
    if not layers or getattr(layers[0], "keys", None) is None:
        return None
    return sum(layer.keys.shape[-2] for layer in layers) / (len(layers) * prompt_len)


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None,
           cache: Any = None, offset: int = 0, prefill: Callable[..., torch.Tensor] | None = None
           ) -> tuple[list[int], float, float, float | None, str]:
    """Greedy decoding with separate prefill and decode timing.

    Decode steps pass explicit ``position_ids`` (prompt length + step), so a
    cache that physically drops tokens (kvpress, a pruned cache) keeps the
    right rotary positions.

    Args:
        input_ids: int64 ``[1, L]``.
        cache: a transformers Cache for the prefill (None: the model's default).
        offset: tokens ``cache`` already holds (a conversation's earlier
            turns); ``input_ids`` continue from there.
        prefill: ``(model, input_ids, cache) -> [1, V]`` last-position logits,
            filling ``cache``: replaces the model's own prefill on an empty
            cache (``Prepared.prefill``).

    Returns:
        (new token ids, prefill seconds, mean seconds per decode step or NaN,
        physical cache length / L after the prefill or None, class name of
        the cache the decode ran on).
    """
    length = input_ids.shape[1]
    start = time.perf_counter()
    positions = {"position_ids": torch.arange(offset, offset + length, device=input_ids.device)[None]} if offset else {}
    if prefill is not None and offset == 0:
        logits = prefill(model, input_ids, cache)
    else:
        out = model(input_ids, use_cache=True, **positions, **cache_kwargs(model, cache))
        logits, cache = out.logits[:, -1], output_cache(out)
    prefill_s = time.perf_counter() - start
    kept = cache_kept_fraction(cache, length)
    cache_name = type(cache).__name__
    token = logits.argmax(-1, keepdim=True)
    new = [token.item()]
    start = time.perf_counter()
    while len(new) < max_new_tokens and new[-1] != eos_id:
        pos = torch.tensor([[offset + length + len(new) - 1]], device=input_ids.device)
        out = model(token, position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
        cache = output_cache(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(token.item())
    steps = len(new) - 1
    decode_s = (time.perf_counter() - start) / steps if steps else float("nan")
    return new, prefill_s, decode_s, kept, cache_name


@torch.no_grad()
def converse(model, tokenizer, sample: Sample, prepared: Prepared, device: torch.device
             ) -> tuple[list[int], float, float, float | None, int, str]:
    """Greedy replies to every turn of ``sample``; the last reply is the answer.

    ``prepared.conversation`` says how a turn reaches the model: ``"append"``
    feeds only the tokens the cache does not hold yet (the previous reply's last
    token and the new turn) on top of one cache kept for the whole
    conversation; ``"reprefill"`` runs the whole conversation so far from a
    fresh cache. Turns are tokenized one by one, so every method sees the same
    token ids for the same text.

    Returns:
        (answer token ids, seconds spent feeding turns, mean seconds per decode
        step, physical cache length / conversation length after the last turn's
        prefill or None, tokens in the conversation when the answer starts,
        class name of the cache of the last turn).
    """
    history: list[int] = []
    cache, fed = None, 0
    feed_s = decode_total = 0.0
    steps = 0
    for i, text in enumerate((sample.prompt, *sample.turns)):
        last = i == len(sample.turns)
        history += tokenizer(text).input_ids
        budget = sample.max_new_tokens if last else sample.reply_tokens
        if prepared.conversation == "append" and cache is not None:
            ids, offset = history[fed:], fed
        else:
            cache = prepared.make_cache() if prepared.make_cache else None
            if cache is None and prepared.conversation == "append":
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
            if prepared.on_prompt:
                prepared.on_prompt(len(history))
            ids, offset = history, 0
        tensor = torch.tensor([ids], dtype=torch.long, device=device)
        new, prefill_s, decode_s, kept, cache_name = greedy(model, tensor, budget, tokenizer.eos_token_id, cache,
                                                            offset, _prefill_hook(prepared, tokenizer))
        if kept is not None:  # greedy measured the cache against the tokens it was fed, not the conversation
            kept = kept * len(ids) / len(history)
        feed_s += prefill_s
        if len(new) > 1:
            decode_total += decode_s * (len(new) - 1)
            steps += len(new) - 1
        answer_start = len(history)
        fed = len(history) + len(new) - 1  # the last new token is not in the cache yet
        history += new
    decode_s = decode_total / steps if steps else float("nan")
    return new, feed_s, decode_s, kept, answer_start, cache_name


def _prefill_hook(prepared: Prepared, tokenizer) -> Callable[..., torch.Tensor] | None:
    """``prepared.prefill`` with the tokenizer bound (None: the model's own prefill)."""
    if prepared.prefill is None:
        return None
    return lambda model, input_ids, cache: prepared.prefill(model, input_ids, cache, tokenizer)


def _kept(prepared: Prepared, from_cache: float | None = None) -> float:
    """The method's own kept fraction, else the cache's physical one, else 1."""
    frac = prepared.kept_fraction()
    if frac is None:
        frac = from_cache
    return 1.0 if frac is None else frac


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


@torch.no_grad()
def gamma_summary(model, input_ids: torch.Tensor, queries: int, worst: int = 3) -> dict[str, Any] | None:
    """Dropped-mass summary of one prefill (``None`` unless the model runs TCA).

    ``mean``/``max``: gamma over layers, KV heads and the sampled queries;
    ``worst``: the ``(layer, kv_head, max gamma)`` of the heads that dropped most,
    so an accuracy loss can be traced to them.
    """
    from ..fidelity import report
    from ..integration import is_applied

    if not is_applied(model):
        return None
    rep = report(model, input_ids, queries=queries, measure=False)
    gmax = rep.gamma_stat("max")
    return {"mean": float(rep.gamma_stat("mean").mean()), "max": float(gmax.max()),
            "worst": [(layer, head, float(gmax[layer, head])) for layer, head in rep.worst()[:worst]]}


def run_task_samples(model, tokenizer, method: Method, prepared: Prepared, samples: list[Sample],
                     length: int, progress: bool = True, gamma_queries: int = 0) -> list[dict[str, Any]]:
    """Generate and score every sample with an already prepared model."""
    device = next(model.parameters()).device
    records = []
    for sample in _progress(samples, f"{method.name} @ {length}", progress):
        ids = _encode(tokenizer, sample.prompt, device)
        if prepared.on_prompt:
            prepared.on_prompt(ids.shape[1])
        gamma = gamma_summary(model, ids, gamma_queries) if gamma_queries else None
        if sample.turns:
            new, prefill_s, decode_s, cache_kept, prompt_tokens, cache_name = converse(
                model, tokenizer, sample, prepared, device)
        else:
            cache = prepared.make_cache() if prepared.make_cache else None
            new, prefill_s, decode_s, cache_kept, cache_name = greedy(model, ids, sample.max_new_tokens,
                                                                      tokenizer.eos_token_id, cache,
                                                                      prefill=_prefill_hook(prepared, tokenizer))
            prompt_tokens = ids.shape[1]
        records.append(_task_record(tokenizer, method, sample, length, new, prompt_tokens, _kept(prepared, cache_kept),
                                    cache_name, prefill_s, decode_s, gamma=gamma))
    return records


def _task_record(tokenizer, method: Method, sample: Sample, length: int, new: list[int], prompt_tokens: int,
                 kv_kept: float, cache_name: str, prefill_s: float, decode_s: float, **extra: Any
                 ) -> dict[str, Any]:
    answer = tokenizer.decode(new, skip_special_tokens=True)
    return {
        "kind": "task", "length": length, "method": method.name, "family": method.family,
        "level": method.level, "task": sample.task, "seed": sample.seed, "prompt_tokens": prompt_tokens,
        "depth": sample.depth, "expected": list(sample.answers),
        "answer": answer, "score": score_fraction(answer, sample), "correct": score(answer, sample),
        "kv_kept": kv_kept, "cache": cache_name, "prefill_s": prefill_s,
        "decode_s_per_token": decode_s, **extra,
    }


def run_shared_samples(model, tokenizer, methods: list[Method], samples: list[Sample], length: int,
                       progress: bool = True) -> list[dict[str, Any]]:
    """Dense and kvpress methods on one dense prefill per sample (``shared.py``).

    Every record's ``prefill_s`` is the shared prefill's time and carries
    ``"shared_prefill": True``; decoding is each method's own.
    """
    from .shared import prefill_for_presses, shareable

    if not all(map(shareable, methods)):
        raise ValueError(f"only dense and kvpress methods share a prefill, not "
                         f"{[m.name for m in methods if not shareable(m)]}")
    conversations = sorted({s.task for s in samples if s.turns})
    if conversations:
        raise ValueError(f"{conversations} are conversations: the shared prefill covers single-turn tasks; "
                         "run those without --share-prefill")
    device = next(model.parameters()).device
    records = []
    for sample in _progress(samples, f"shared prefill @ {length}", progress):
        ids = _encode(tokenizer, sample.prompt, device)
        presses = {m.name: m.press(ids.shape[1]) for m in methods if m.press is not None}
        start = time.perf_counter()
        logits, dense_cache, caches = prefill_for_presses(model, ids, presses)
        prefill_s = time.perf_counter() - start
        for method in methods:
            cache = dense_cache if method.press is None else caches[method.name]
            new, _, decode_s, cache_kept, cache_name = greedy(model, ids, sample.max_new_tokens,
                                                              tokenizer.eos_token_id, cache,
                                                              prefill=lambda *_, first=logits: first)
            records.append(_task_record(tokenizer, method, sample, length, new, ids.shape[1],
                                        1.0 if cache_kept is None else cache_kept, cache_name, prefill_s,
                                        decode_s, gamma=None, shared_prefill=True))
    return records


@torch.no_grad()
def run_perplexity(model, tokenizer, method: Method, prepared: Prepared, token_ids: list[int],
                   cfg: SuiteConfig, length: int) -> list[dict[str, Any]]:
    """Per-bucket NLL of ``cfg.ppl_samples`` windows of ``length`` tokens."""
    device = next(model.parameters()).device
    records = []
    for i in range(cfg.ppl_samples):
        window = torch.tensor(text_window(token_ids, length, cfg.seed + i), device=device)
        if prepared.on_prompt:
            prepared.on_prompt(length)
        cache = prepared.make_cache() if prepared.make_cache else None
        start = time.perf_counter()
        out = model(window[None, :-1], use_cache=True, **cache_kwargs(model, cache))  # kvpress hooks need a cache
        prefill_s = time.perf_counter() - start
        logits, cache = out.logits[0], output_cache(out)
        cache_kept = cache_kept_fraction(cache, length)
        nlls = bucket_nll(logits, window[1:], cfg.bucket)
        records.append({
            "kind": "perplexity", "length": length, "method": method.name, "family": method.family,
            "level": method.level, "task": "perplexity", "seed": cfg.seed + i, "source": cfg.ppl_source,
            "bucket": cfg.bucket, "bucket_nll": nlls,
            "ppl": perplexity(nlls, bucket_sizes(length, cfg.bucket)), "kv_kept": _kept(prepared, cache_kept),
            "cache": type(cache).__name__, "prefill_s": prefill_s,
        })
    return records


def run_suite(model, tokenizer, methods: list[Method], cfg: SuiteConfig) -> list[dict[str, Any]]:
    """Every method on every length; returns all records (see ``report.py``)."""
    text_ids = tokenizer(natural_text(cfg.ppl_source)).input_ids if cfg.ppl_samples else []
    if cfg.ppl_samples and len(text_ids) < max(cfg.lengths) + 1:  # before any method runs
        raise ValueError(f"the {cfg.ppl_source} text has {len(text_ids)} tokens; a perplexity window of "
                         f"{max(cfg.lengths)} needs {max(cfg.lengths) + 1}")
    if cfg.samples:
        need, task = shortest_context(tokenizer, cfg.tasks, range(cfg.seed, cfg.seed + cfg.samples))
        for length in (n for n in cfg.lengths if n < need):
            logger.warning("length %d is shorter than the shortest %s prompt plus its answer (%d tokens): its "
                           "prompts will be longer than %d", length, task, need, length)
    from .shared import shareable

    shared = [m for m in methods if cfg.share_prefill and shareable(m)]
    records: list[dict[str, Any]] = []
    for length in cfg.lengths:
        samples = make_samples(tokenizer, cfg, length)
        if shared and cfg.samples:
            logger.info("running %s at %d tokens on %d samples, one shared prefill each",
                        [m.name for m in shared], length, len(samples))
            records += run_shared_samples(model, tokenizer, shared, samples, length, cfg.progress)
        for method in methods:
            if method in shared and not cfg.ppl_samples:
                continue
            logger.info("running %s at %d tokens on %d samples", method.name, length, len(samples))
            prepared = method.prepare(model, length)
            try:
                if method not in shared:
                    records += run_task_samples(model, tokenizer, method, prepared, samples, length,
                                                cfg.progress, cfg.gamma_queries)
                if cfg.ppl_samples:
                    records += run_perplexity(model, tokenizer, method, prepared, text_ids, cfg, length)
            finally:
                prepared.cleanup()
    return records
