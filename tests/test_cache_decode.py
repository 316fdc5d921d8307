"""Long generations with TCACache against an independent float64 implementation of the decode rule,
and the host bookkeeping that CUDA-graph replays of a decode step rely on.

The reference (``KeptSetReference``) is written from docs/method.md (section 5) alone: a
float64 copy of the model runs over a plain ``DynamicCache`` (every token's K/V), and per
layer a boolean kept mask decides what decode attends to. Prefill selection comes from
``reference.py``; the window stays exact; whenever a whole block has left it, the block keeps
its top-``t`` tokens by the current query's attention over the kept set, averaged over the KV
head's query heads, ``t = floor(E[k])``. Nothing of the implementation's state feeds it.
"""

import copy
import math
import random

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface

import tca_flex
from tca_flex import HeadBudgets, TCACache, TCAConfig, bench
from tca_flex.config import SelectionConfig
from tca_flex.hfcompat import cache_kwargs
from tca_flex.reference import reference_attention, reference_importance, reference_keep, reference_mask

from .conftest import tiny_llama_config

REF_NAME = "tca_flex_test_kept_set_reference"


def mixed_budgets(fractions, config):
    """``fractions[layer][head]``: each KV head keeps that fraction of every block (on average)."""
    probs = torch.stack([torch.cat([HeadBudgets.uniform(1, 1, f, config).probs[0] for f in row])
                         for row in fractions])
    return HeadBudgets(probs=probs, config=config)


class KeptSetReference:
    """The TCA decode rule in float64, one kept mask ``[B, H_kv, T]`` per layer (see the module doc)."""

    def __init__(self, budgets: HeadBudgets):
        self.config, self.probs = budgets.config, budgets.probs
        b = self.config.block_size
        # t = floor(sum_k k * p_k), straight from the definition.
        self.t = [[math.floor(sum(k * float(p[k]) for k in range(b + 1)) + 1e-9) for p in layer]
                  for layer in budgets.probs]
        self.kept: dict[int, torch.Tensor] = {}
        self.first_uncompressed: dict[int, int] = {}

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        cfg, layer = self.config, module.layer_idx
        w, b = cfg.window, cfg.block_size
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        bsz, hq, q_len, _ = query.shape
        hkv, total = key.shape[1], key.shape[2]
        g = hq // hkv
        if q_len == total:  # prefill
            assert total > cfg.dense_up_to, "the reference covers sparse prefills only"
            knobs = SelectionConfig(block_size=b, window=w, alpha=cfg.alpha, normalize=cfg.normalize_redundancy)

            def keep(spread):
                imp = reference_importance(query, key, scale, cfg.num_observation_queries, cfg.gqa_aggregation,
                                           spread, w)
                return reference_keep(imp, self.probs[layer], knobs)

            glob = keep(cfg.spread_observation_queries)
            out = reference_attention(query, key, value, reference_mask(glob, w, hq), scale)
            if cfg.cache_spread_observation_queries is not None:  # the cache keeps its own selection
                glob = keep(cfg.cache_spread_observation_queries)
            glob[..., total - w:] = True  # the final window
            self.kept[layer], self.first_uncompressed[layer] = glob, total - w
            return out.transpose(1, 2).to(query.dtype), None
        assert q_len == 1
        newest = total - 1
        kept = torch.cat([self.kept[layer], torch.ones(bsz, hkv, 1, dtype=torch.bool)], dim=-1)
        out = torch.empty(bsz, hq, 1, query.shape[-1], dtype=torch.float64)
        probs = torch.zeros(bsz, hq, total, dtype=torch.float64)
        for r in range(bsz):
            for h in range(hq):
                pos = kept[r, h // g].nonzero()[:, 0]
                p = torch.softmax(key[r, h // g, pos].double() @ query[r, h, 0].double() * scale, 0)
                out[r, h, 0] = p @ value[r, h // g, pos].double()
                probs[r, h, pos] = p
        first = self.first_uncompressed[layer]
        if newest - (w + cfg.grace_blocks * b) + 1 - first >= b:  # [first, first + b) is `grace` blocks past it
            block = torch.arange(first, first + b)
            for r in range(bsz):
                for kvh in range(hkv):
                    imp = probs[r, kvh * g:(kvh + 1) * g, block].mean(0)
                    order = sorted(range(b), key=lambda i: (-float(imp[i]), i))  # ties: the older token
                    kept[r, kvh, block] = False
                    kept[r, kvh, block[order[: self.t[layer][kvh]]]] = True
            self.first_uncompressed[layer] = first + b
        self.kept[layer] = kept
        return out.transpose(1, 2).to(query.dtype), None


def reference_generate(model, prompt, new_tokens, budgets):
    """Greedy tokens and per-step logits of the float64 reference."""
    ref = KeptSetReference(budgets)
    AttentionInterface.register(REF_NAME, ref.attention)
    AttentionMaskInterface.register(REF_NAME, lambda *args, **kwargs: None)  # the reference masks itself
    model.set_attn_implementation(REF_NAME)
    cache = DynamicCache(config=model.config)
    tokens, logits = prompt, []
    step = prompt
    for _ in range(new_tokens):
        out = model(step, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
        logits.append(out)
        step = out.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, step], dim=1)
    return tokens, torch.stack(logits, 1), ref


@pytest.mark.parametrize("grace, spread, cache_spread", [(0, 0, None), (1, 0, None), (1, 6, 0)],
                         ids=["paper", "grace", "grace-cache-last"])
@torch.no_grad()
def test_long_generation_equals_the_float64_kept_set_reference(grace, spread, cache_spread):
    """Prefill, decode and block compression of ``TCACache`` against ``KeptSetReference``; with
    ``cache_spread`` the prefill attends over one selection and the cache keeps another."""
    torch.manual_seed(11)
    # std 0.2: a random tiny model whose greedy tokens vary (the default init repeats one token).
    model = LlamaForCausalLM(tiny_llama_config(initializer_range=0.2)).eval()
    model.generation_config.eos_token_id = None  # every run makes all its tokens, as the reference does
    reference_model = copy.deepcopy(model).double()
    config = TCAConfig(block_size=16, window=64, grace_blocks=grace, spread_observation_queries=spread,
                       cache_spread_observation_queries=cache_spread)
    budgets = mixed_budgets([[0.25, 0.5], [0.125, 0.75]], config)
    prompt = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(3))
    new_tokens = 320

    tca_flex.apply(model, budgets=budgets)
    cache = TCACache(model)
    got = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **cache_kwargs(model, cache))
    want_tokens, want_logits, ref = reference_generate(reference_model, prompt, new_tokens, budgets)

    assert got.sequences[0].tolist() == want_tokens[0].tolist()
    torch.testing.assert_close(torch.stack(got.logits, 1).double(), want_logits, atol=2e-4, rtol=1e-4)
    # The same kept sets at the end, and many compressions on the way (t = 2 .. 12 of 16).
    for layer, cache_layer in enumerate(cache.layers):
        for h in range(2):
            assert torch.equal(cache_layer.kept_positions(0, h), ref.kept[layer][0, h].nonzero()[:, 0])
        assert ref.first_uncompressed[layer] - (200 - 64) == 16 * ((new_tokens - 1 - 16 * grace) // 16)
    assert len(set(want_tokens[0, 200:].tolist())) > 20, "a degenerate generation would test little"
    # Sparse decode must matter here, or the comparison proves nothing: dense decoding differs.
    tca_flex.remove(model)
    dense = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    assert not torch.equal(dense, want_tokens)


SPARSE = TCAConfig(block_size=16, window=64)


def decode_inputs(length):
    """The static inputs of a captured decode step (``bench.tpot``): token 0 at position ``length``."""
    return dict(input_ids=torch.zeros(1, 1, dtype=torch.long), position_ids=torch.tensor([[length]]),
                cache_position=torch.tensor([length]), use_cache=True, logits_to_keep=1)


@pytest.mark.parametrize("two_graphs", [False, True])
@torch.no_grad()
def test_replay_bookkeeping_leaves_the_cache_as_eager_steps(tiny_llama, two_graphs):
    """``bench.tpot`` on CPU runs each step inside ``graph_capture`` and counts it with ``replayed``:
    what a CUDA-graph replay does to the cache (device work of the captured step, host counters
    advanced by hand). With one graph the compression runs on every step; with two, only where the
    host says a block leaves. Either way the cache must end exactly as after plain eager steps."""
    tca_flex.apply(tiny_llama, budgets=mixed_budgets([[0.25, 0.5], [0.125, 0.75]], SPARSE))
    prompt = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(4))
    caches = [TCACache(tiny_llama, reserve_tokens=64) for _ in range(2)]
    for cache in caches:
        tiny_llama(prompt, **cache_kwargs(tiny_llama, cache))
    steps = 40  # crosses compressions at positions 215 and 231
    # A fresh token at every step (a replay's static input buffer rewritten by the caller), so
    # the compressions choose among distinct keys rather than copies of one.
    tokens = torch.randint(0, 256, (steps, 1, 1), generator=torch.Generator().manual_seed(random.randint(0, 10**6)))
    fed = iter(tokens)

    def step_fn(input_ids, **kwargs):
        return tiny_llama(input_ids=next(fed), **kwargs)

    timing = bench.tpot(tiny_llama, caches[0], 200, torch.device("cpu"), steps, two_graphs=two_graphs,
                        step_fn=step_fn)
    assert timing["steps"] == steps and timing["ms_leaving"] is not None
    assert next(fed, None) is None  # every step ran through step_fn
    for token in tokens:
        tiny_llama(**{**decode_inputs(200), "input_ids": token}, **cache_kwargs(tiny_llama, caches[1]))
    for replayed, eager in zip(caches[0].layers, caches[1].layers, strict=True):
        assert replayed.get_seq_length() == eager.get_seq_length() == 240
        for name in ("k_buf", "v_buf", "owner", "pos", "var_len", "ncs", "next_pos"):
            assert torch.equal(getattr(replayed, name), getattr(eager, name)), name


@torch.no_grad()
def test_replayable_steps_count_the_steps_before_a_growth(tiny_llama):
    tca_flex.apply(tiny_llama, budgets=mixed_budgets([[0.25, 0.5], [0.125, 0.75]], SPARSE))
    cache = TCACache(tiny_llama, growth=0.0, min_chunk_blocks=1)
    tiny_llama(torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(5)),
               **cache_kwargs(tiny_llama, cache))
    left = cache.replayable_steps()
    assert 0 < left < 100
    with pytest.raises(RuntimeError, match="reserve more tokens"):
        cache.replayed(left + 1)
    slots = [layer.k_buf.shape[1] for layer in cache.layers]
    for _ in range(left):
        tiny_llama(**decode_inputs(cache.get_seq_length()), **cache_kwargs(tiny_llama, cache))
    assert [layer.k_buf.shape[1] for layer in cache.layers] == slots, "no growth within replayable_steps()"
    assert cache.replayable_steps() == 0
    with pytest.raises(RuntimeError, match="larger reserve_tokens"), cache.graph_capture():
        pass
    tiny_llama(**decode_inputs(cache.get_seq_length()), **cache_kwargs(tiny_llama, cache))
    assert any(layer.k_buf.shape[1] > n for layer, n in zip(cache.layers, slots, strict=True))
