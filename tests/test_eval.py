import contextlib
import hashlib
import json
import math
import random
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaForCausalLM

from tca_flex import HeadBudgets, TCAConfig, shipped_budgets
from tca_flex.config import SelectionConfig, parse_overrides
from tca_flex.eval import baselines, methods, perplexity, report, runner, tasks
from tca_flex.eval.cli import evaluate, parse_args
from tca_flex.eval.install import install_policy
from tca_flex.hfcompat import cache_kwargs, kwargs_cache, output_cache
from tca_flex.integration import attention_modules
from tca_flex.selection import select

from .cli_checks import refused_before_loading
from .conftest import tiny_llama_config


class ByteTokenizer:
    """Tokenizer-free path for the tiny random Llama (vocab 256): one token per byte."""

    eos_token_id = None

    def __call__(self, text):
        return SimpleNamespace(input_ids=list(text.encode("utf-8")))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


TOK = ByteTokenizer()
CFG = TCAConfig(block_size=32, window=128)


def fresh_seed():
    return random.SystemRandom().randrange(1, 10**6)


# ---------------------------------------------------------------- generators


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_generators_are_deterministic_per_seed(name):
    seed = fresh_seed()
    gen = tasks.TASKS[name]
    a, b, other = gen(TOK, 3000, seed), gen(TOK, 3000, seed), gen(TOK, 3000, seed + 1)
    assert a == b
    assert a.prompt != other.prompt
    assert a.task == name and a.answers
    for answer in a.answers:
        assert answer in a.prompt
    # A conversation's budget covers every turn, reply and the answer; a single prompt's
    # covers the prompt (the suite leaves room for the answer, which can be long).
    n = tasks.sample_tokens(TOK, a) - (0 if a.turns else a.max_new_tokens)
    assert 0.85 * 3000 <= n <= 1.1 * 3000, n


def test_needles_sit_at_their_depth():
    seed = fresh_seed()
    s = tasks.passkey(TOK, 4000, seed, depth=0.75)
    rel = s.prompt.index(f"The pass key is {s.answers[0]}") / len(s.prompt)
    assert abs(rel - 0.75) < 0.05
    single = tasks.niah_single(TOK, 4000, seed)
    # Depth is relative to the haystack, between the fixed head and the question.
    start, end = len(tasks._NIAH_HEAD), single.prompt.rindex("\nWhat is")
    rel = (single.prompt.index(single.answers[0]) - start) / (end - start)
    assert abs(rel - single.depth) < 0.05


def test_multikey_has_distractors_and_asks_one_key():
    s = tasks.niah_multikey(TOK, 3000, fresh_seed())
    found = re.findall(r"special magic numbers for ([a-z-]+) is: (\d+)", s.prompt)
    assert len(found) == 4 and len({k for k, _ in found}) == 4
    asked = re.search(r"What is the special magic number for ([a-z-]+)", s.prompt).group(1)
    assert dict(found)[asked] == s.answers[0]


def test_variable_tracking_chain_resolves_to_the_answers():
    s = tasks.variable_tracking(TOK, 3000, fresh_seed())
    value = re.search(r"assigned the value (\d+) in the text", s.prompt).group(1)
    assigned = dict(re.findall(r"VAR ([A-Z]+\d*) = (\S+?)\. ", s.prompt))
    refs = dict(re.findall(r"VAR ([A-Z]+\d*) = VAR ([A-Z]+\d*)\.", s.prompt))
    holders = {v for v, rhs in assigned.items() if rhs == value}
    changed = True
    while changed:
        new = {v for v, src in refs.items() if src in holders}
        changed = not new <= holders
        holders |= new
    assert holders == set(s.answers) and len(holders) == 5


def test_word_extraction_answers_are_the_most_frequent_words():
    seed = fresh_seed()
    cwe = tasks.common_words(TOK, 4000, seed)
    counts = Counter(re.findall(r"^\d+\. (\w+)$", cwe.prompt, re.M))
    top = [w for w, _ in counts.most_common(len(cwe.answers))]
    assert set(top) == set(cwe.answers)
    assert min(counts[w] for w in cwe.answers) > max(c for w, c in counts.items() if w not in cwe.answers)
    fwe = tasks.frequent_words(TOK, 4000, seed)
    body = fwe.prompt.split("\n")[1]
    counts = Counter(w.strip() for w in body.split("...."))
    ranked = counts.most_common(4)
    assert [w for w, _ in ranked[:3]] == list(fwe.answers) and ranked[2][1] > ranked[3][1]


# ---------------------------------------------------------------- scorers


def test_multi_turn_states_facts_first_and_asks_one_last():
    s = tasks.multi_turn(TOK, 3000, fresh_seed())
    found = dict(re.findall(r"special magic number for ([a-z-]+) is (\d+)", s.prompt))
    assert len(found) == 4 and s.answers[0] in found.values()
    asked = re.search(r"What is the special magic number for ([a-z-]+)", s.turns[-1]).group(1)
    assert found[asked] == s.answers[0]
    for turn in s.turns[:-1]:  # distractors: other keys, never the answer
        others = dict(re.findall(r"special magic number for ([a-z-]+) is (\d+)", turn))
        assert len(others) == 2 and not set(others) & set(found) and s.answers[0] not in turn
    assert s.reply_tokens > 0 and all(t.endswith("Assistant:") for t in s.turns[:-1])


def test_scorers_on_right_wrong_and_partial_answers():
    s = tasks.niah_multivalue(TOK, 1500, fresh_seed())
    a, b, c, d = s.answers
    right, wrong, partial = f" {a}, {b}, {c} and {d}.", " 1234567, 7654321.", f" {a} and {c} only."
    assert tasks.score(right, s) and tasks.score_fraction(right, s) == 1.0
    assert not tasks.score(wrong, s) and tasks.score_fraction(wrong, s) == 0.0
    assert not tasks.score(partial, s) and tasks.score_fraction(partial, s) == 0.5
    words = tasks.common_words(TOK, 1500, fresh_seed())
    upper = " ".join(w.upper() for w in words.answers)
    assert tasks.score(upper, words)  # RULER matches case-insensitively
    assert tasks.score_fraction(" ".join(words.answers[:3]), words) == pytest.approx(0.3)


# ---------------------------------------------------------------- perplexity


def test_bucket_nll_matches_cross_entropy_per_chunk():
    g = torch.Generator().manual_seed(fresh_seed())
    logits, targets = torch.randn(2500, 50, generator=g), torch.randint(0, 50, (2500,), generator=g)
    nlls = perplexity.bucket_nll(logits, targets, 1024)
    assert len(nlls) == 3
    manual = [-(logits[s:s + 1024].log_softmax(-1).gather(1, targets[s:s + 1024, None])).mean().item()
              for s in (0, 1024, 2048)]
    assert nlls == pytest.approx(manual, rel=1e-5)
    whole = F.cross_entropy(logits, targets).item()
    total = perplexity.perplexity(nlls, perplexity.bucket_sizes(2500))
    assert total == pytest.approx(math.exp(whole), rel=1e-5)


def test_text_window_is_seeded_and_sized():
    ids = TOK(perplexity.natural_text("pydoc")).input_ids
    assert len(ids) > 100_000
    seed = fresh_seed()
    w = perplexity.text_window(ids, 777, seed)
    assert w == perplexity.text_window(ids, 777, seed) and len(w) == 778
    with pytest.raises(ValueError, match="need"):
        perplexity.text_window(ids[:100], 777, seed)


def test_the_shipped_gpl3_text_is_the_one_the_smollm2_budgets_were_calibrated_on():
    # The budget file's provenance names the text by hash; the package ships that text, so the
    # calibration command in docs/calibration.md reproduces on any machine.
    text = perplexity.natural_text("gpl3")
    notes = shipped_budgets("smollm2").notes
    assert hashlib.sha256(text.encode()).hexdigest() == notes["text_sha256"]


# ---------------------------------------------------------------- baselines keep their budget


def rand_qk(length, hq=4, hkv=2, d=16, seed=None):
    g = torch.Generator().manual_seed(seed or fresh_seed())
    q = torch.randn(1, hq, length, d, generator=g)
    k = torch.randn(1, hkv, length, d, generator=g) * 2
    v = torch.randn(1, hkv, length, d, generator=g)
    return q, k, v


def test_streaming_sees_exactly_its_budget():
    length, budget, sinks = 301, 77, 4
    vis = baselines.streaming_visible(torch.arange(length), length, budget, sinks)
    assert torch.equal(vis.sum(-1), torch.clamp(torch.arange(length) + 1, max=budget))
    assert vis[-1, :sinks].all() and vis[-1, -(budget - sinks):].all()
    assert not torch.triu(vis, diagonal=1).any()


def test_snapkv_keeps_exact_budget_and_the_true_top_k():
    length, budget, obs, kernel = 300, 90, 16, 7
    q, k, _ = rand_qk(length)
    keep = baselines.snapkv_keep(q, k, 0.25, budget, obs, kernel)
    assert torch.equal(keep.sum(-1), torch.full((1, 2), budget))
    assert keep[..., -obs:].all()
    # Brute force: full attention rows of the last obs queries, mean over them and the GQA pair.
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.25
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    rows = scores.masked_fill(~causal, float("-inf")).softmax(-1)[:, :, -obs:].mean(2)
    s = rows.view(1, 2, 2, length).mean(2)[..., :length - obs]
    pooled = torch.stack([s[..., max(0, i - 3):i + 4].mean(-1) for i in range(length - obs)], -1)
    for h in range(2):
        kept_scores = pooled[0, h][keep[0, h, :length - obs]]
        dropped = pooled[0, h][~keep[0, h, :length - obs]]
        assert kept_scores.min() >= dropped.max() - 1e-6


def test_tca_keep_is_selection_plus_final_window():
    length = 300
    q, k, _ = rand_qk(length)
    cdf = HeadBudgets.uniform(1, 2, 0.25, CFG).cdf(0)
    sel = select(q, k, cdf, SelectionConfig(block_size=32, window=128, alpha=0.5), scaling=0.25)
    keep = baselines.tca_keep(sel.positions, sel.counts, length, 128)
    assert torch.equal(keep.sum(-1), sel.counts + 128)
    assert torch.equal(keep.sum(-1), torch.full((1, 2), methods.tca_kv_tokens(length, 8, CFG)))


def test_decode_attends_to_exactly_the_kept_keys():
    length = 260
    q, k, v = rand_qk(length + 3)
    keep = baselines.snapkv_keep(q[:, :, :length], k[:, :, :length], 0.25, 70, 8, 5)
    q_new = q[:, :, -1:]
    out = baselines.masked_attention(q_new, k, v, lambda p: baselines.keep_then_new(keep, p, length + 3),
                                     0.25)
    for h in range(4):
        idx = torch.cat([keep[0, h // 2].nonzero().flatten(), torch.arange(length, length + 3)])
        assert idx.numel() == 73
        ref = F.scaled_dot_product_attention(q_new[:, h], k[:, h // 2, idx], v[:, h // 2, idx], scale=0.25)
        torch.testing.assert_close(out[:, h], ref, atol=1e-5, rtol=1e-5)


def run_method(model, prepared, ids, forced=None):
    """Prefill ``ids`` into the method's own cache, then feed ``forced`` ``[1, n]`` one token a step.

    Returns ``(logits [1, L + n, V], kept fraction after the prefill, the cache,
    per step whether the cache said a block leaves the window on it)``, as
    ``runner.greedy`` runs a method.
    """
    forced = ids[:, :0] if forced is None else forced
    cache = prepared.make_cache() if prepared.make_cache else None
    out = model(ids, use_cache=True, **cache_kwargs(model, cache))
    cache, logits, leaves = output_cache(out), [out.logits], []
    kept = runner._kept(prepared, runner.cache_kept_fraction(cache, ids.shape[1]))
    for i in range(forced.shape[1]):
        leaves.append(cache.block_leaves_next() if hasattr(cache, "block_leaves_next") else None)
        pos = torch.tensor([[ids.shape[1] + i]])
        step = model(forced[:, i:i + 1], position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
        cache = output_cache(step)
        logits.append(step.logits)
    return torch.cat(logits, 1), kept, cache, leaves


@torch.no_grad()
def test_streaming_prefill_is_sdpa_under_its_explicit_mask(tiny_llama):
    """The StreamingLLM baseline's prompt logits equal the model's own SDPA under the 4-D mask of
    ``streaming_visible`` (sinks + recent window), built here outside the policy."""
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(fresh_seed()))
    budget = methods.tca_kv_tokens(300, 0.25 * CFG.block_size, CFG)
    visible = baselines.streaming_visible(torch.arange(300), 300, budget, 4)
    additive = torch.zeros(1, 1, 300, 300).masked_fill(~visible, torch.finfo(torch.float32).min)
    want = tiny_llama(ids, attention_mask=additive).logits
    prepared = methods.streaming(0.25, CFG).prepare(tiny_llama, 300)
    try:
        got = tiny_llama(ids).logits
    finally:
        prepared.cleanup()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - tiny_llama(ids).logits).abs().max() > 1e-4  # the mask matters on this prompt


@torch.no_grad()
def test_methods_keep_equal_budgets_on_a_model(tiny_llama):
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(fresh_seed()))
    dense_logits = tiny_llama(ids).logits
    expected = methods.tca_kv_tokens(300, 0.25 * 32, CFG) / 300
    for m in methods.build_methods(["tca", "tca_emulated", "streaming", "snapkv"], [0.25], CFG):
        prepared = m.prepare(tiny_llama, 300)
        try:
            logits, kept, cache, _ = run_method(tiny_llama, prepared, ids, ids[:, :1])
            assert kept == pytest.approx(expected, abs=1e-9), m.name
            assert type(cache).__name__ == ("TCACache" if m.family == "tca" else "DynamicCache"), m.name
            assert torch.isfinite(logits).all()
            if m.family != "snapkv":  # SnapKV prefills densely; the others change the prompt's logits
                assert (logits[:, :300] - dense_logits).abs().max() > 1e-4, m.name
            else:
                torch.testing.assert_close(logits[:, :300], dense_logits, atol=1e-4, rtol=1e-4)
        finally:
            prepared.cleanup()
        assert tiny_llama.config._attn_implementation == "sdpa"
        assert not any(hasattr(mod, "_tca_eval_kv") for mod in attention_modules(tiny_llama))
    torch.testing.assert_close(tiny_llama(ids).logits, dense_logits)


@torch.no_grad()
def test_tca_runs_the_real_cache_and_the_emulation_only_until_a_block_leaves(tiny_llama):
    """``tca`` decodes with ``TCACache``: the emulation's logits (kept set fixed at the prefill)
    until the first block leaves the window, then the cache compresses that block and holds fewer keys."""
    rng = random.SystemRandom()
    budgets = methods.spread_budgets(2, 2, rng.uniform(0.1, 0.4), CFG)
    length = rng.randrange(260, 420)
    g = torch.Generator().manual_seed(fresh_seed())
    ids, forced = torch.randint(0, 256, (1, length), generator=g), torch.randint(0, 256, (1, 70), generator=g)
    runs = {}
    for m in (methods.tca_budgets(budgets, "c"), methods.tca_file("tca_emulated", budgets, "c")):
        prepared = m.prepare(tiny_llama, length)
        try:
            runs[m.name] = run_method(tiny_llama, prepared, ids, forced)
        finally:
            prepared.cleanup()
    (real, real_kept, cache, leaves), (emul, emul_kept, dyn, _) = runs["tca[c]"], runs["tca_emulated[c]"]
    assert type(cache).__name__ == "TCACache" and type(dyn).__name__ == "DynamicCache"
    assert real_kept == emul_kept < 0.8
    first = leaves.index(True)  # a block leaves within b + 1 steps of any prompt length
    assert first <= 33 and sum(leaves) >= 2
    # Prefill and the steps before any block leaves: the same keys, the same logits.
    torch.testing.assert_close(real[:, :length + first], emul[:, :length + first], atol=1e-4, rtol=1e-4)
    assert (real[:, length + first + 1:] - emul[:, length + first + 1:]).abs().max() > 1e-3
    # The emulation still sees every prompt token it kept plus all 70 new ones; the cache compressed blocks.
    emulated_keys = round(emul_kept * length) + 70
    assert cache.memory_report().total.kept_tokens / (2 * 2) < emulated_keys - 8
    assert dyn.get_seq_length() == cache.get_seq_length() == length + 70


def test_spread_budgets_match_the_uniform_mean_but_rank_blocks():
    keep = random.SystemRandom().uniform(0.05, 0.6)
    spread = methods.spread_budgets(3, 2, keep, CFG, sigma=1.0)
    assert torch.allclose(spread.expected_per_block(), torch.full((3, 2), keep * 32, dtype=torch.float64))
    from tca_flex.selection import budget_ladder

    ladder = budget_ladder(spread.cdf(0), 16)[0]
    assert (ladder[:-1] >= ladder[1:]).all() and ladder[0] > ladder[-1] + 8


@torch.no_grad()
def test_given_budgets_plug_in_with_matching_baselines(tiny_llama):
    budgets = methods.spread_budgets(2, 2, random.SystemRandom().uniform(0.15, 0.5), CFG)
    tca_m = methods.tca_budgets(budgets, "calibrated")
    (snap,) = methods.build_methods(["snapkv"], [methods.mean_keep(budgets)], budgets.config)
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(fresh_seed()))
    kept = []
    for m in (tca_m, snap):
        prepared = m.prepare(tiny_llama, 300)
        try:
            # A token count: the fraction times 300 can land at 219.99999999999997.
            kept.append(round(run_method(tiny_llama, prepared, ids)[1] * 300))
        finally:
            prepared.cleanup()
    assert tca_m.name == "tca[calibrated]" and tca_m.level == pytest.approx(methods.mean_keep(budgets))
    assert kept[1] == methods.tca_kv_tokens(300, methods.mean_keep(budgets) * 32, CFG)
    assert abs(kept[0] - kept[1]) <= 8  # the quantile ladder rounds per block (seen: <= 5)


@torch.no_grad()
def test_budgets_prefill_shares_the_sparse_prefill_but_decodes_over_the_full_cache(tiny_llama):
    budgets = methods.spread_budgets(2, 2, random.SystemRandom().uniform(0.1, 0.4), CFG)
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(fresh_seed()))
    nxt = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(fresh_seed()))
    logits, steps = {}, {}
    for m in (methods.tca_budgets_prefill(budgets, "c"), methods.tca_budgets(budgets, "c")):
        prepared = m.prepare(tiny_llama, 300)
        try:
            out, kept, cache, _ = run_method(tiny_llama, prepared, ids, nxt)
            logits[m.name], steps[m.name] = out[:, :300], out[:, 300:]
            if m.family == "tca_prefill_budgets":
                assert kept == 1.0 and type(cache).__name__ == "DynamicCache"  # nothing evicted
                # A full-cache decode step is plain SDPA over every prompt key.
                layer = attention_modules(tiny_llama)[0]
                assert not hasattr(layer, "_tca_eval_kv")
            else:
                assert kept < 0.9 and type(cache).__name__ == "TCACache"
        finally:
            prepared.cleanup()
    torch.testing.assert_close(logits["tca_prefill[c]"], logits["tca[c]"])
    assert (logits["tca[c]"] - tiny_llama(ids).logits).abs().max() > 1e-4  # the prefill is sparse
    assert (steps["tca_prefill[c]"] - steps["tca[c]"]).abs().max() > 1e-4  # only the pruned cache drops keys


@torch.no_grad()
def test_mask_backend_equals_flexattention(tiny_llama):
    """Explicit-mask TCA (no compiles) gives the flex emulation's and the flex prefill's logits, prefill and decode."""
    config = CFG.replace(num_observation_queries=4, spread_observation_queries=5, pool_kernel=3)
    budgets = methods.spread_budgets(2, 2, random.SystemRandom().uniform(0.1, 0.5), config)
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(fresh_seed()))
    nxt = torch.randint(0, 256, (1, 2), generator=torch.Generator().manual_seed(fresh_seed()))
    pairs = [(methods.tca_file("tca_emulated", budgets, "c"), methods.tca_budgets(budgets, "c", "mask")),
             (methods.tca_budgets_prefill(budgets, "c"), methods.tca_budgets_prefill(budgets, "c", "mask"))]
    assert [m.name for _, m in pairs] == ["tca_mask[c]", "tca_prefill_mask[c]"]  # labelled as what they run
    for pair in pairs:
        results = []
        for m in pair:
            prepared = m.prepare(tiny_llama, 300)
            try:
                logits, kept, cache, _ = run_method(tiny_llama, prepared, ids, nxt)
                results.append((logits, kept, type(cache).__name__))
            finally:
                prepared.cleanup()
        (flex_logits, flex_kept, flex_cache), (mask_logits, mask_kept, mask_cache) = results
        torch.testing.assert_close(mask_logits, flex_logits, atol=1e-4, rtol=1e-4)
        assert flex_kept == mask_kept and flex_cache == mask_cache == "DynamicCache"
    with pytest.raises(ValueError, match="backend"):
        methods.tca_budgets(budgets, "c", "sdpa")


def test_installing_twice_is_refused(tiny_llama):
    policy = baselines.SnapKVPolicy(lambda n: 100)
    cleanup = install_policy(tiny_llama, lambda layer: policy)
    with pytest.raises(ValueError, match="already installed"):
        install_policy(tiny_llama, lambda layer: policy)
    cleanup()


def test_config_overrides_parse_into_config_fields():
    opts = parse_overrides(["num_observation_queries=32", "normalize_redundancy=true", "gqa_aggregation=max"])
    assert TCAConfig(**opts).num_observation_queries == 32 and opts["normalize_redundancy"] is True
    assert parse_overrides(["guard_floor=0.8"]) == {"guard_floor": 0.8}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_overrides(["windw=3"])


def test_every_config_field_parses_back_from_its_text():
    """Each field, written as a command line writes it, parses to the same value and type (optional
    fields included: their default, None, does not give their type)."""
    config = TCAConfig.accurate(block_size=64, window=512, mass_criterion="lse", mass_quantile=0.1, guard_floor=0.5,
                                cache_spread_observation_queries=3, normalize_redundancy=True)
    for name, value in config.to_dict().items():
        parsed = parse_overrides([f"{name}={value}"])[name]
        assert parsed == value and type(parsed) is type(value), name
    assert parse_overrides(["cache_spread_observation_queries=none", "mass_quantile=None"]) == {
        "cache_spread_observation_queries": None, "mass_quantile": None}
    with pytest.raises(ValueError, match="cache_spread_observation_queries takes an integer or none"):
        parse_overrides(["cache_spread_observation_queries=0.5"])


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown methods"):
        methods.build_methods(["dense", "h2o"], [0.5], CFG)
    with pytest.raises(ValueError, match="unknown tasks"):
        runner.SuiteConfig(tasks=("passkey", "qa"))


# ---------------------------------------------------------------- reports and the smoke run


def test_summary_averages_tasks_and_keeps_ppl_apart():
    recs = [dict(kind="task", length=1024, method="m", family="tca", level=0.5, task=t, score=s, kv_kept=0.4,
                 prefill_s=1.0, decode_s_per_token=0.1) for t, s in [("a", 1.0), ("a", 0.5), ("b", 0.0)]]
    recs.append(dict(kind="perplexity", length=1024, method="m", family="tca", level=0.5, task="perplexity",
                     bucket=1024, bucket_nll=[math.log(5.0)], kv_kept=0.4, prefill_s=2.0))
    (row,) = report.summarize(recs)
    assert row["accuracy"] == {"a": 75.0, "b": 0.0} and row["average"] == 37.5
    assert row["ppl"] == pytest.approx(5.0) and row["prefill_s"] == 1.0
    assert "| m | 75.0 | 0.0 | 37.5 | - | 5.00 | 0.400 |" in report.markdown_tables([row])
    # Records from before the cache field: unknown; otherwise the classes that decoded.
    assert row["cache"] == "unknown" and report.markdown_tables([row]).rstrip().endswith("| 100.0 | unknown |")
    recs[0]["cache"] = recs[1]["cache"] = "TCACache"
    assert report.summarize(recs)[0]["cache"] == "TCACache+unknown"
    for r in recs:
        r["cache"] = "TCACache"
    assert "| 100.0 | TCACache |" in report.markdown_tables(report.summarize(recs))


def test_paired_difference_pairs_samples_by_seed():
    rng = random.Random(fresh_seed())
    scores = {(m, t, seed): rng.choice([0.0, 0.25, 0.5, 1.0]) for m in ("dense", "x") for t in "abc"
              for seed in range(5)}
    recs = [dict(kind="task", length=512, method=m, family=m, level=1.0, task=t, seed=seed, score=v, kv_kept=1.0,
                 prefill_s=0.1, decode_s_per_token=0.01) for (m, t, seed), v in scores.items()]
    recs.append({**recs[0], "method": "x", "seed": 99})  # unpaired: ignored
    per_seed = [100 * sum(scores[("x", t, s)] - scores[("dense", t, s)] for t in "abc") / 3 for s in range(5)]
    mean = sum(per_seed) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in per_seed) / 4)
    got, half = report.paired_difference(recs, 512, "x")
    assert got == pytest.approx(mean) and half == pytest.approx(1.96 * sd / math.sqrt(5))
    assert report.paired_difference(recs, 512, "dense") == (None, None)
    rows = {r["method"]: r for r in report.summarize(recs)}
    assert rows["x"]["vs_dense"] == pytest.approx(mean) and rows["dense"]["vs_dense"] is None


@torch.no_grad()
def test_smoke_run_end_to_end(tiny_llama, tmp_path):
    args = parse_args(["--smoke", "--no-progress", "--out", str(tmp_path)])
    args.lengths, args.tasks, args.window, args.block = [300], ["passkey", "niah_multikey"], 128, 32
    rows, table = evaluate(tiny_llama, TOK, args, tmp_path)
    assert {r["method"] for r in rows} == {"dense", "tca-k0.25", "streaming-k0.25", "snapkv-k0.25"}
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["records"]) == 4 * 3  # two task samples + one perplexity window per method
    kept = {r["method"]: r["kv_kept"] for r in data["summary"]}
    assert kept["dense"] == 1.0
    assert kept["tca-k0.25"] == kept["streaming-k0.25"] == kept["snapkv-k0.25"] < 1.0
    ppl = {r["method"]: r["ppl"] for r in data["summary"]}
    assert all(p > 1.0 and math.isfinite(p) for p in ppl.values())
    assert ppl["snapkv-k0.25"] == pytest.approx(ppl["dense"], rel=1e-4)
    assert (tmp_path / "accuracy_vs_kv.png").stat().st_size > 1000
    assert "tca-k0.25" in table and (tmp_path / "results.md").read_text() == table
    # The TCA method ran the shipped path: its records, task and perplexity, decoded with TCACache.
    caches = {(r["method"], r["kind"]): r["cache"] for r in data["records"]}
    assert len(caches) == 4 * 2
    for (method, kind), cache in caches.items():
        assert cache == ("TCACache" if method == "tca-k0.25" else "DynamicCache"), (method, kind)
    assert {r["method"]: r["cache"] for r in data["summary"]}["tca-k0.25"] == "TCACache"
    assert "| TCACache |" in table


@torch.no_grad()
def test_multi_turn_smoke_run_appends_and_reprefills(tiny_llama, tmp_path):
    args = parse_args(["--smoke", "--no-progress", "--out", str(tmp_path)])
    args.lengths, args.tasks, args.window, args.block = [1500], ["multi_turn"], 128, 32
    args.methods, args.keep, args.ppl_samples = ["dense", "tca", "tca_reprefill"], [1.0, 0.25], 0
    args.seed = fresh_seed()
    evaluate(tiny_llama, TOK, args, tmp_path)
    by = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["records"]}
    assert set(by) == {"dense", "tca-k1", "tca_reprefill-k1", "tca-k0.25", "tca_reprefill-k0.25"}
    assert {name: r["cache"] for name, r in by.items()} == {name: "DynamicCache" if name == "dense" else "TCACache"
                                                           for name in by}
    dense = by["dense"]
    assert dense["kv_kept"] == 1.0
    assert 1200 < dense["prompt_tokens"] < 1800 and dense["task"] == "multi_turn"  # bytes: coarse sizing
    # Keeping every token, appending turn after turn and re-prefilling are both dense.
    for name in ("tca-k1", "tca_reprefill-k1"):
        assert by[name]["answer"] == dense["answer"], name
        assert by[name]["kv_kept"] == 1.0
    assert by["tca-k0.25"]["kv_kept"] < 0.7
    assert by["tca-k0.25"]["prompt_tokens"] == by["tca_reprefill-k0.25"]["prompt_tokens"] > 1200


@torch.no_grad()
def test_conversation_appended_to_a_dense_cache_equals_reprefilling(tiny_llama):
    sample = tasks.multi_turn(TOK, 500, fresh_seed())
    runs = [runner.converse(tiny_llama, TOK, sample, methods.Prepared(cleanup=lambda: None, conversation=mode),
                            torch.device("cpu")) for mode in ("append", "reprefill")]
    assert runs[0][0] == runs[1][0] and runs[0][4] == runs[1][4]
    assert runs[0][5] == runs[1][5] == "DynamicCache"
    # The same conversation through generate, turn by turn, gives the same answer.
    history, out = [], None
    for text in (sample.prompt, *sample.turns):
        history = (out[0].tolist() if out is not None else []) + TOK(text).input_ids
        budget = sample.max_new_tokens if text is sample.turns[-1] else sample.reply_tokens
        out = tiny_llama.generate(torch.tensor([history]), max_new_tokens=budget, do_sample=False)
    assert out[0, len(history):].tolist() == runs[0][0]


@torch.no_grad()
@pytest.mark.parametrize("press", ["SnapKVPress", "SnapKVPress-w32k7", "StreamingLLMPress", "TOVAPress", "KnormPress",
                                   "PyramidKVPress-w32k7"])
def test_kvpress_keeps_tca_budget(tiny_llama, press):
    pytest.importorskip("kvpress", reason="kvpress runs from a separate venv (EVALUATION.md)")
    (method,) = methods.build_methods([f"kvpress:{press}"], [0.25], CFG)
    ids = torch.randint(0, 256, (1, 290), generator=torch.Generator().manual_seed(fresh_seed()))
    prepared = method.prepare(tiny_llama, 300)
    try:
        prepared.on_prompt(290)
        new, _, _, kept, cache = runner.greedy(tiny_llama, ids, 3, None)
    finally:
        prepared.cleanup()
    assert len(new) == 3 and cache.endswith("Cache")  # the class of the cache the press leaves
    assert abs(kept * 290 - methods.tca_kv_tokens(290, 8, CFG)) <= 1


def test_prompts_plus_answers_fit_the_context_with_the_real_tokenizer():
    from tca_flex.models import default_cache_dir

    if not (default_cache_dir() / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 tokenizer not cached (run load_smollm2 once)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_cache_dir())
    cfg = runner.SuiteConfig(lengths=(2048,), samples=1, seed=fresh_seed())
    samples = runner.make_samples(tok, cfg, 2048)
    assert [s.task for s in samples] == list(tasks.TASKS)
    for s in samples:
        n = tasks.sample_tokens(tok, s)
        assert 0.85 * 2048 < n <= 2048, (s.task, n)


def test_gamma_summary_traces_dropped_mass_per_sample(tiny_llama):
    import tca_flex
    from tca_flex.eval.runner import gamma_summary

    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(fresh_seed()))
    assert gamma_summary(tiny_llama, ids, 8) is None  # dense model: nothing to report
    tca_flex.apply(tiny_llama, budgets=tca_flex.HeadBudgets.uniform(2, 2, 0.1, TCAConfig(block_size=32,
                                                                                         window=128)))
    sparse = gamma_summary(tiny_llama, ids, 8)
    assert 0 < sparse["mean"] <= sparse["max"] <= 1
    assert len(sparse["worst"]) == 3 and sparse["worst"][0][2] == sparse["max"]
    tca_flex.remove(tiny_llama)
    tca_flex.apply(tiny_llama, budgets=tca_flex.HeadBudgets.uniform(2, 2, 0.1, TCAConfig(block_size=32,
                                                                                         window=512)))
    assert gamma_summary(tiny_llama, ids, 8)["max"] == 0  # window covers the prompt: exact


def test_cli_keep_may_be_empty_for_budget_files_only():
    from tca_flex.eval.cli import parse_args

    args = parse_args(["--keep", "--budgets", "b.json", "--tca-backend", "mask", "--methods", "dense", "snapkv"])
    assert args.keep == [] and args.tca_backend == "mask"
    assert [m.name for m in methods.build_methods(args.methods, args.keep, CFG)] == ["dense"]


def test_cli_tca_options_reach_the_budget_files_methods(tiny_llama, tmp_path, monkeypatch):
    """``--tca-option`` overrides a budget file's knobs; ``--methods tca_recon`` alone runs no ``tca[FILE]``."""
    from tca_flex.eval import cli

    path = tmp_path / "b.json"
    HeadBudgets.uniform(2, 2, 0.25, CFG.replace(pool_kernel=7)).save(path)
    seen = []

    def stop(model, tokenizer, methods_, cfg):
        seen.extend(methods_)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_suite", stop)
    args = parse_args(["--keep", "--budgets", str(path), "--methods", "tca_recon", "--tca-option", "pool_kernel=3",
                       "--no-progress", "--out", str(tmp_path / "out")])
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_llama, TOK, args, tmp_path / "out")
    assert [m.name for m in seen] == ["tca_recon[b]"]
    prepared = seen[0].prepare(tiny_llama, 300)
    try:
        assert all(m._tca_layer.config.pool_kernel == 3 for m in attention_modules(tiny_llama))
    finally:
        prepared.cleanup()


@torch.no_grad()
def test_tca_recon_with_keep_all_answers_a_conversation_as_dense(tiny_llama, tmp_path):
    args = parse_args(["--smoke", "--no-progress", "--out", str(tmp_path)])
    args.lengths, args.tasks, args.window, args.block = [1500], ["multi_turn"], 128, 32
    args.methods, args.keep, args.ppl_samples, args.seed = ["dense", "tca_recon"], [1.0, 0.25], 0, fresh_seed()
    evaluate(tiny_llama, TOK, args, tmp_path)
    by = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["records"]}
    assert set(by) == {"dense", "tca_recon-k1", "tca_recon-k0.25"}
    assert by["tca_recon-k1"]["answer"] == by["dense"]["answer"] and by["tca_recon-k1"]["kv_kept"] == 1.0
    assert by["tca_recon-k0.25"]["cache"] == "TCACache" and by["tca_recon-k0.25"]["kv_kept"] < 0.7


# ---------------------------------------------------------------- sharded runs


@given(samples=st.integers(0, 40), ppl=st.integers(0, 40), seed=st.integers(0, 10**6), workers=st.integers(1, 16))
def test_shards_cover_every_seed_once(samples, ppl, seed, workers):
    from tca_flex.eval.parallel import plan_shards

    shards = plan_shards(samples, ppl, seed, workers)
    assert len(shards) <= workers
    task_seeds = [s.seed + i for s in shards for i in range(s.samples)]
    ppl_seeds = [s.seed + i for s in shards for i in range(s.ppl_samples)]
    assert task_seeds == list(range(seed, seed + samples))
    assert ppl_seeds == list(range(seed, seed + ppl))


def _comparable(records):
    timing = {"prefill_s", "decode_s_per_token"}
    return sorted(json.dumps({k: v for k, v in r.items() if k not in timing}, sort_keys=True) for r in records)


@torch.no_grad()
def test_merged_shards_equal_the_serial_run(tiny_llama, tmp_path):
    from tca_flex.eval.parallel import merge_runs, plan_shards

    base = ["--lengths", "300", "--tasks", "passkey", "niah_single", "--methods", "dense", "snapkv", "--keep",
            "0.25", "--block", "32", "--window", "128", "--no-progress", "--seed", str(fresh_seed())]
    serial = parse_args([*base, "--samples", "3", "--ppl-samples", "2"])
    evaluate(tiny_llama, TOK, serial, tmp_path / "serial")
    parts = []
    for k, shard in enumerate(plan_shards(3, 2, serial.seed, 2)):
        args = parse_args([*base, "--seed", str(shard.seed), "--samples", str(shard.samples),
                           "--ppl-samples", str(shard.ppl_samples)])
        evaluate(tiny_llama, TOK, args, tmp_path / str(k))
        parts.append(tmp_path / str(k))
    merged, meta = merge_runs(parts)
    expected = json.loads((tmp_path / "serial" / "results.json").read_text())["records"]
    assert len(merged) == 2 * (2 * 3 + 2)
    assert _comparable(merged) == _comparable(expected)
    assert [p["samples"] for p in meta["parts"]] == [2, 1]
    report.write_reports(tmp_path / "merged", merged, meta)
    again, meta_again = merge_runs([tmp_path / "merged"])  # a merged run merges like its parts
    assert _comparable(again) == _comparable(merged) and meta_again["parts"] == meta["parts"]
    assert {r["cache"] for r in again} == {"DynamicCache"}
    # A part written before the cache field merges too; its records count as unknown.
    old = json.loads((parts[1] / "results.json").read_text())
    for r in old["records"]:
        del r["cache"]
    (parts[1] / "results.json").write_text(json.dumps(old))
    rows, table = report.write_reports(tmp_path / "mixed", *merge_runs(parts))
    assert {r["cache"] for r in rows} == {"DynamicCache+unknown"} and "| DynamicCache+unknown |" in table
    with pytest.raises(ValueError, match="overlap"):
        merge_runs([parts[0], parts[0]])
    other = parse_args([*base, "--window", "64", "--seed", str(serial.seed + 10), "--samples", "1",
                        "--ppl-samples", "0"])
    evaluate(tiny_llama, TOK, other, tmp_path / "other")
    with pytest.raises(ValueError, match="other settings"):
        merge_runs([parts[0], tmp_path / "other"])


def test_workers_run_the_cli_in_processes_and_merge(tmp_path):
    from tca_flex.models import default_cache_dir

    if not (default_cache_dir() / "model.safetensors").is_file():
        pytest.skip("SmolLM2 not cached (run load_smollm2 once)")
    from tca_flex.eval.cli import main

    main(["--lengths", "256", "--tasks", "passkey", "--methods", "dense", "tca", "--keep", "0.25", "--samples", "2",
          "--ppl-samples", "0", "--workers", "2", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert sorted(r["seed"] for r in data["records"] if r["method"] == "dense") == [0, 1]
    assert {(r["method"], r["cache"]) for r in data["records"]} == {("dense", "DynamicCache"),
                                                                  ("tca-k0.25", "TCACache")}
    assert {r["method"]: r["cache"] for r in data["summary"]} == {"dense": "DynamicCache", "tca-k0.25": "TCACache"}
    assert data["meta"]["workers"] == 2 and len(data["meta"]["parts"]) == 2
    assert (tmp_path / "parts" / "1" / "results.json").is_file()


def test_failed_workers_are_reported_with_their_log(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tca_flex.eval.cli import main

    # A folder with a tokenizer (the lengths check passes) but no weights (every worker fails).
    tok = Tokenizer(models.WordLevel({"w": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "no-weights")
    with pytest.raises(RuntimeError, match=r"workers failed(.|\n)*log\.txt"):
        main(["--model", str(tmp_path / "no-weights"), "--lengths", "256", "--tasks", "passkey", "--methods",
              "dense", "--keep", "--samples", "2", "--ppl-samples", "0", "--workers", "2", "--no-progress",
              "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("args, error", [
    (["--lengths", "2048", "10"], "argument --lengths: [10] too short: the shortest passkey prompt plus its answer "
                                  "takes {need} tokens"),
    (["--lengths", "-5"], "argument --lengths: must be >= 1, got -5"),
    (["--workers", "0"], "argument --workers: must be >= 1, got 0"),
    (["--samples", "-1"], "argument --samples: must be >= 0, got -1"),
    (["--samples", "0", "--ppl-samples", "0"], "nothing to run: --samples and --ppl-samples are both 0"),
    (["--keep", "0.1", "1.5"], "argument --keep: must be in [0.0, 1.0], got 1.5"),
    (["--tca-option", "alpha=abc"], "--tca-option 'alpha=abc': alpha takes a number, got 'abc'"),
    (["--tca-option", "normalize_redundancy=ture"], "normalize_redundancy takes true or false, got 'ture'"),
    (["--tca-option", "window=64"], "--tca-option 'window=64': window has its own flag, use --window"),
    (["--window", "16", "--block", "32"], "argument --window: TCAConfig.window=16 is out of range"),
    (["--device", "bogus"], "argument --device: "),
    (["--out", "{tmp}/file"], "argument --out: {tmp}/file exists and is not a folder"),
    (["--out", "{tmp}/file/sub"], "argument --out: {tmp}/file is a file, so {tmp}/file/sub cannot be created"),
    (["--budgets", "{tmp}/missing.json"], "argument --budgets: "),
    (["--budgets", "{tmp}/file"], "argument --budgets: {tmp}/file is not valid JSON"),
    (["--model", "{tmp}/no-such-model"], "argument --model: {tmp}/no-such-model is not a folder"),
    (["--merge", "{tmp}"], "argument --merge: no results.json in {tmp}"),
])
def test_cli_mistakes_end_in_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, args, error):
    from tca_flex.eval import cli

    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_model", loaded)
    monkeypatch.setattr(cli, "load_tokenizer", lambda path: TOK)
    (tmp_path / "file").write_text("{")
    base = ["--lengths", "2048", "--tasks", "passkey", "--samples", "2", "--ppl-samples", "0", "--out",
            str(tmp_path / "out"), "--seed", str(fresh_seed())]
    line = refused_before_loading(cli.main, base, [a.format(tmp=tmp_path) for a in args], "tca_flex.eval", capsys)
    seed = int(base[-1])
    need = max(tasks.count_tokens(TOK, s.prompt) + s.max_new_tokens
               for s in (tasks.passkey(TOK, 1, seed + i) for i in range(2)))
    assert error.format(tmp=tmp_path, need=need) in line
    assert not (tmp_path / "out").exists()


@given(task=st.sampled_from(sorted(tasks.TASKS)), seed=st.integers(0, 10**6), asked=st.integers(1, 4000))
def test_no_task_makes_a_context_shorter_than_the_refused_lengths(task, seed, asked):
    """Lengths below ``shortest_context`` are refused because no prompt of the task (plus answer) is that short."""
    need, which = runner.shortest_context(TOK, [task], [seed])
    sample = tasks.TASKS[task](TOK, asked, seed)
    assert which == task and tasks.count_tokens(TOK, sample.prompt) + sample.max_new_tokens >= need
    # Over several tasks and seeds: the longest of the minima.
    other = sorted(tasks.TASKS)[seed % len(tasks.TASKS)]
    both = runner.shortest_context(TOK, [task, other], [seed, seed + 1])
    assert both == max(runner.shortest_context(TOK, [t], [s]) for t in (task, other) for s in (seed, seed + 1))


def test_long_recall_lists_entries_in_order_and_asks_a_long_answer():
    s = tasks.long_recall(TOK, 3000, fresh_seed())
    entries = re.findall(r"Inventory entry (\d+): ([a-z]+)\. ", s.prompt)
    assert [int(n) for n, _ in entries] == list(range(1, 41))
    assert tuple(w for _, w in entries) == s.answers and len(set(s.answers)) == 40
    assert s.prompt.endswith("Inventory entry 1:")
    # One list, copied back whole: its entries stand together and the answer budget holds it
    # (~435 tokens with SmolLM2's tokenizer; this byte tokenizer needs more).
    listing = "".join(f" Inventory entry {i + 1}: {w}. " for i, w in enumerate(s.answers))
    assert listing in s.prompt and s.max_new_tokens == tasks.count_tokens(TOK, listing) + 16
    # Scored by the fraction recalled: half the entries give half the score.
    half = " ".join(f"Inventory entry {i + 1}: {w}." for i, w in enumerate(s.answers[:20]))
    assert tasks.score_fraction(half, s) == 0.5 and not tasks.score(half, s)


class InPlacePress:
    """A press with kvpress's interface: keeps the keys of largest ``score``, compressing in place.

    ``__call__`` hooks the model the way kvpress does (compress each layer's cache right after its
    attention, during the prefill only), so it is the per-press reference the shared prefill must equal.
    The score mixes in the layer's hidden states and key positions, so a press fed another layer's
    inputs, or keys after an earlier press, would keep other tokens.
    """

    def __init__(self, compression_ratio, salt):
        self.compression_ratio, self.salt = compression_ratio, salt

    def post_init_from_model(self, model):
        pass

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        n = keys.shape[2]
        score = keys.norm(dim=-1) * torch.cos(self.salt * torch.arange(n)) + hidden_states.mean(-1)[:, None]
        idx = score.topk(max(1, round(n * (1 - self.compression_ratio))), dim=-1).indices.sort(-1).values
        idx = idx[..., None].expand(-1, -1, -1, keys.shape[-1])
        return keys.gather(2, idx), values.gather(2, idx)

    @contextlib.contextmanager
    def __call__(self, model):
        def hook(module, args, kwargs, output):
            layer = kwargs_cache(kwargs).layers[module.layer_idx]
            if kwargs["hidden_states"].shape[1] > 1:
                layer.keys, layer.values = self.compress(module, kwargs["hidden_states"], layer.keys,
                                                         layer.values, output[1], kwargs)
            return output

        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_modules(model)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def in_place_method(ratio, salt):
    def prepare(model, length):
        context = InPlacePress(ratio, salt)(model)
        context.__enter__()
        return methods.Prepared(cleanup=lambda: context.__exit__(None, None, None))

    return methods.Method(f"press-{ratio}-{salt}", "press", ratio, prepare, lambda n: InPlacePress(ratio, salt))


@torch.no_grad()
@given(ratios=st.lists(st.floats(0.2, 0.8), min_size=1, max_size=3), length=st.integers(300, 600))
@settings(max_examples=3, deadline=None)
def test_shared_prefill_gives_each_press_the_answers_of_its_own_prefill(ratios, length):
    from tca_flex.eval.shared import prefill_for_presses

    torch.manual_seed(fresh_seed())
    model = LlamaForCausalLM(tiny_llama_config(initializer_range=0.2)).eval()
    all_methods = [methods.dense(), *(in_place_method(r, i + 1) for i, r in enumerate(ratios))]
    samples = [tasks.passkey(TOK, length, fresh_seed()), tasks.niah_multikey(TOK, length, fresh_seed())]
    shared = runner.run_shared_samples(model, TOK, all_methods, samples, length, progress=False)
    alone = []
    for method in all_methods:
        prepared = method.prepare(model, length)
        try:
            alone += runner.run_task_samples(model, TOK, method, prepared, samples, length, progress=False)
        finally:
            prepared.cleanup()
    key = lambda r: (r["task"], r["method"])  # noqa: E731
    shared, alone = sorted(shared, key=key), sorted(alone, key=key)
    assert [(r["answer"], r["kv_kept"]) for r in shared] == [(r["answer"], r["kv_kept"]) for r in alone]
    assert all(r["shared_prefill"] for r in shared)
    assert min(r["kv_kept"] for r in shared) < 0.9  # the presses did compress
    # The caches themselves: each press's equals the one its own hooked prefill leaves.
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(fresh_seed()))
    _, dense_cache, caches = prefill_for_presses(model, ids, {m.name: m.press(length) for m in all_methods[1:]})
    for method in all_methods[1:]:
        own = DynamicCache(config=model.config)
        with method.press(length)(model):
            model(ids, use_cache=True, **cache_kwargs(model, own))
        for a, b in zip(caches[method.name].layers, own.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert dense_cache.get_seq_length() == length


def test_shared_prefill_refuses_conversations_and_sparse_methods(tiny_llama):
    talk = tasks.multi_turn(TOK, 500, fresh_seed())
    with pytest.raises(ValueError, match="conversations"):
        runner.run_shared_samples(tiny_llama, TOK, [methods.dense()], [talk], 500, progress=False)
    with pytest.raises(ValueError, match="only dense and kvpress"):
        runner.run_shared_samples(tiny_llama, TOK, [methods.dense(), *methods.build_methods(["snapkv"], [0.3], CFG)],
                                  [tasks.passkey(TOK, 400, fresh_seed())], 400, progress=False)


@torch.no_grad()
@pytest.mark.parametrize("press", ["SnapKVPress-w32k7", "StreamingLLMPress", "TOVAPress", "KnormPress",
                                   "PyramidKVPress-w32k7", "ExpectedAttentionPress"])
def test_kvpress_caches_from_the_shared_prefill_equal_the_press_own(tiny_llama, press):
    pytest.importorskip("kvpress", reason="kvpress runs from a separate venv (EVALUATION.md)")
    from tca_flex.eval.shared import prefill_for_presses

    (method,) = methods.build_methods([f"kvpress:{press}"], [0.25], CFG)
    ids = torch.randint(0, 256, (1, 290), generator=torch.Generator().manual_seed(fresh_seed()))
    _, _, caches = prefill_for_presses(tiny_llama, ids, {"p": method.press(290)})
    prepared = method.prepare(tiny_llama, 290)
    try:
        own = DynamicCache(config=tiny_llama.config)
        tiny_llama(ids, use_cache=True, **cache_kwargs(tiny_llama, own))
    finally:
        prepared.cleanup()
    for a, b in zip(caches["p"].layers, own.layers, strict=True):
        assert a.keys.shape[-2] < 290 and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_cli_says_when_a_budget_file_adds_its_tca_method(tiny_llama, tmp_path, monkeypatch, caplog):
    """``--methods snapkv --budgets FILE`` also runs ``tca[FILE]``: documented, and said when it happens."""
    from tca_flex.eval import cli

    path = tmp_path / "b.json"
    HeadBudgets.uniform(2, 2, random.uniform(0.15, 0.6), CFG).save(path)
    seen = []

    def stop(model, tokenizer, methods_, cfg):
        seen.extend(methods_)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_suite", stop)
    for listed, said in ((["snapkv"], True), (["snapkv", "tca"], False), (["snapkv", "tca_prefill"], False)):
        seen.clear()
        caplog.clear()
        args = parse_args(["--keep", "--budgets", str(path), "--methods", *listed, "--no-progress",
                           "--out", str(tmp_path / "out")])
        with pytest.raises(KeyboardInterrupt):
            evaluate(tiny_llama, TOK, args, tmp_path / "out")
        assert ("also runs tca[b]" in caplog.text) == said
        assert ("tca[b]" in [m.name for m in seen]) == ("tca_prefill" not in listed)


def test_pooled_against_lists_each_method_with_its_paired_difference():
    """The pool scripts' table: methods by average, each with ``method - it`` paired by seed over every run."""
    rng = random.Random()
    seeds = {"tca[b]": range(0, 6), "dense": range(0, 6), "snapkv": range(0, 3)}  # snapkv ran fewer seeds
    records = [{"kind": "task", "length": 2048, "method": m, "seed": s, "task": t, "score": rng.random()}
               for m, ss in seeds.items() for s in ss for t in ("passkey", "niah_single")]
    records.append({"kind": "task", "length": 4096, "method": "dense", "seed": 0, "task": "passkey", "score": 1.0})
    table = report.pooled_against(records, 2048, "tca[b]").splitlines()
    averages = {m: sum(100 * r["score"] for r in records if r["method"] == m and r["length"] == 2048)
                / (2 * len(ss)) for m, ss in seeds.items()}
    assert [line.split()[0] for line in table[1:]] == sorted(averages, key=lambda m: -averages[m])
    for line in table[1:]:
        name, span, avg = line.split()[:3]
        assert span == f"0-{max(seeds[name])}" and float(avg) == pytest.approx(averages[name], abs=0.05)
        mean, half = report.paired_difference(records, 2048, "tca[b]", name)
        assert line.endswith("-" if mean is None else f"{mean:+.1f} ± {half:.1f}")
