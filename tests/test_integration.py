import copy
import dataclasses
import logging
import random
import re
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

import tca_flex
from tca_flex import HeadBudgets, TCAConfig
from tca_flex.attention import tca_prefill_attention
from tca_flex.hfcompat import cache_kwargs
from tca_flex.integration import TCA_LENGTH_SOURCE

from .conftest import tiny_llama_config
from .oracles import ReferenceModel

SPARSE = TCAConfig(block_size=32, window=128)


def ids(length, bsz=1, seed=0):
    return torch.randint(0, 256, (bsz, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_window_covering_the_prompt_is_exactly_dense(tiny_llama):
    x = ids(200)
    dense_logits = tiny_llama(x).logits
    dense_gen = tiny_llama.generate(x, max_new_tokens=6, do_sample=False)
    tca_flex.apply(tiny_llama, TCAConfig(block_size=32, window=256))
    assert torch.equal(tiny_llama(x).logits, dense_logits)
    assert torch.equal(tiny_llama.generate(x, max_new_tokens=6, do_sample=False), dense_gen)


@torch.no_grad()
def test_min_sparse_length_runs_shorter_prompts_dense(tiny_llama):
    """A prompt no longer than ``min_sparse_length`` (a run-time knob: budgets calibrated without it
    take it) runs transformers' SDPA, exactly dense, with the sparse budgets; one token longer runs TCA."""
    x = ids(300, seed=random.randint(1, 10**6))
    dense_logits = tiny_llama(x).logits
    budgets = HeadBudgets.uniform(2, 2, 0.1, SPARSE)
    tca_flex.apply(tiny_llama, SPARSE.replace(min_sparse_length=300), budgets=budgets)
    assert torch.equal(tiny_llama(x).logits, dense_logits)
    tca_flex.remove(tiny_llama)
    tca_flex.apply(tiny_llama, SPARSE.replace(min_sparse_length=299), budgets=budgets)
    assert (tiny_llama(x).logits - dense_logits).abs().max() > 1e-4


@torch.no_grad()
def test_full_budget_equals_dense(tiny_llama):
    x = ids(300, bsz=2)
    dense_logits = tiny_llama(x).logits
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.dense(2, 2, SPARSE))
    torch.testing.assert_close(tiny_llama(x).logits, dense_logits, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_sparse_prefill_generate_and_remove(tiny_llama):
    x = ids(300)
    dense_logits = tiny_llama(x).logits
    budgets = HeadBudgets.uniform(2, 2, 0.1, SPARSE)
    tca_flex.apply(tiny_llama, budgets=budgets)
    sparse_logits = tiny_llama(x).logits
    # Queries inside the first window see everything: identical there.
    torch.testing.assert_close(sparse_logits[:, :128], dense_logits[:, :128], atol=2e-5, rtol=1e-4)
    assert (sparse_logits[:, 200:] - dense_logits[:, 200:]).abs().max() > 1e-4
    out = tiny_llama.generate(x, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    # Sparse prefill, then dense decode over the full cache: every step against the float64 reference.
    want = ReferenceModel(budgets, pruned=False).logits(tiny_llama, out.sequences, 300)
    torch.testing.assert_close(torch.stack(out.logits, 1), want.float(), atol=1e-4, rtol=1e-4)
    tca_flex.remove(tiny_llama)
    assert torch.equal(tiny_llama(x).logits, dense_logits)


@torch.no_grad()
def test_compiled_model_matches_eager(tiny_llama):
    x = ids(300)
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.3, SPARSE))
    eager = tiny_llama(x).logits
    compiled = torch.compile(tiny_llama)
    torch.testing.assert_close(compiled(x).logits, eager, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="first, then torch.compile"):
        tca_flex.apply(compiled)


@pytest.mark.parametrize("anchor", [0, 20])
def test_prefill_compiles_without_graph_breaks(anchor):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    config = SPARSE.replace(anchor_blocks=anchor)  # 20 > the prompt's 6 blocks: the anchored ladder
    probs = torch.rand(1, 2, config.block_size + 1, dtype=torch.float64) ** 4
    cdf = HeadBudgets(probs=probs / probs.sum(-1, keepdim=True), config=config).cdf(0)
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, c: tca_prefill_attention(a, b, c, cdf, config, 0.25), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), tca_prefill_attention(q, k, v, cdf, config, 0.25),
                               atol=1e-5, rtol=1e-5)


def test_bad_models_and_inputs_are_refused(tiny_llama):
    tca_flex.apply(tiny_llama, SPARSE)
    with pytest.raises(ValueError, match="already applied"):
        tca_flex.apply(tiny_llama, SPARSE)
    padded = torch.ones(2, 300, dtype=torch.long)
    padded[0, -7:] = 0  # right padding (left padding is supported: test_batch.py)
    with torch.no_grad(), pytest.raises(ValueError, match="left padding only"):
        tiny_llama(ids(300, bsz=2), attention_mask=padded)
    tca_flex.remove(tiny_llama)
    with pytest.raises(ValueError, match="3 layers x 2 KV heads"):
        tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(3, 2, 0.5, SPARSE))
    with pytest.raises(ValueError, match="block_size"):
        tca_flex.apply(tiny_llama, TCAConfig(block_size=64, window=128),
                       budgets=HeadBudgets.uniform(2, 2, 0.5, SPARSE))
    with pytest.raises(TypeError, match="budgets=.*HeadBudgets.*dict"):
        tca_flex.apply(tiny_llama, budgets={"probs": [[[1.0]]]})
    with pytest.raises(TypeError, match="config must be a TCAConfig.*budgets="):
        tca_flex.apply(tiny_llama, HeadBudgets.uniform(2, 2, 0.5, SPARSE))
    windowed = LlamaForCausalLM(tiny_llama_config())
    windowed.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="does not support model_type"):
        tca_flex.apply(windowed)
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               num_key_value_heads=1, sliding_window=64))
    with pytest.raises(ValueError, match="sliding window"):
        tca_flex.apply(mistral)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Qwen2 lists its layers' kinds: sliding from layer max_window_layers on, whatever is flipped later.
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                                        sliding_window=64, max_window_layers=1))
    qwen.config.use_sliding_window = False
    with pytest.raises(ValueError, match=r"sliding window \(64\) in layers \[1, 2\].*use_sliding_window=False"):
        tca_flex.apply(qwen)
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2))
    with pytest.raises(ValueError, match="encoder-decoder"):
        tca_flex.apply(t5)


@torch.no_grad()
def test_float64_model_gets_a_clear_error(tiny_llama):
    tca_flex.apply(tiny_llama.double(), SPARSE)
    with pytest.raises(TypeError, match=r"tca_flex supports .*got torch.float64"):
        tiny_llama(ids(300))


def test_mask_function_is_none_only_when_plainly_causal():
    from transformers.masking_utils import causal_mask_function

    from tca_flex.integration import tca_mask

    kw = dict(q_offset=0, kv_offset=0, mask_function=causal_mask_function, allow_is_causal_skip=True,
              device="cpu")
    assert tca_mask(1, 64, 64, attention_mask=None, **kw) is None
    assert tca_mask(1, 1, 64, attention_mask=None, **{**kw, "q_offset": 63}) is None
    # Decode over a preallocated cache of 64 slots holding 11 tokens: the empty slots stay masked.
    static = tca_mask(1, 1, 64, attention_mask=None, **{**kw, "q_offset": 10, "allow_is_causal_skip": False})
    assert static is not None and static[0, 0, 0, :11].all() and not static[0, 0, 0, 11:].any()
    # A chunked prefill (4 queries on 64 keys) needs the offset mask.
    chunk = tca_mask(1, 4, 64, attention_mask=None, **{**kw, "q_offset": 60, "allow_is_causal_skip": False})
    assert chunk is not None and chunk.shape[-2:] == (4, 64)
    padding = torch.ones(2, 64, dtype=torch.bool)
    padding[0, :5] = False
    # A padded prefill gets its 2-D padding mask (the attention checks it is left padding); a
    # decode step over it the 4-D mask.
    assert torch.equal(tca_mask(2, 64, 64, attention_mask=padding, **kw), padding)
    assert tca_mask(2, 64, 64, attention_mask=torch.ones(2, 64, dtype=torch.bool), **kw) is None
    step = tca_mask(2, 1, 64, attention_mask=padding, **{**kw, "q_offset": 63})
    assert step.shape == (2, 1, 1, 64) and not step[0, 0, 0, :5].any() and step[1, 0, 0].all()


@torch.no_grad()
def test_static_cache_decode_matches_sdpa(tiny_llama):
    """A preallocated StaticCache is longer than what it holds: its empty slots must stay masked."""
    from transformers import StaticCache

    x = ids(100)
    step = dict(input_ids=torch.tensor([[3]]), position_ids=torch.tensor([[100]]), cache_position=torch.tensor([100]))

    def decode_logits():
        cache = StaticCache(config=tiny_llama.config, max_cache_len=160)
        tiny_llama(x, **cache_kwargs(tiny_llama, cache), use_cache=True)
        return tiny_llama(**cache_kwargs(tiny_llama, cache), use_cache=True, **step).logits

    want = decode_logits()
    tca_flex.apply(tiny_llama, SPARSE)
    torch.testing.assert_close(decode_logits(), want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_tca_flex_compile_wraps_torch_compile(tiny_llama, tca_compile_settings):
    from tca_flex.compile import compiled_flex_attention  # the module stays importable beside the function

    assert callable(compiled_flex_attention)
    with pytest.raises(ValueError, match=r"call tca_flex.apply\(model\) first"):
        tca_flex.compile(tiny_llama)
    x = ids(300)
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.3, SPARSE))
    eager = tiny_llama(x).logits
    compiled = tca_flex.compile(tiny_llama, backend="aot_eager")
    assert torch._dynamo.config.recompile_limit >= 64
    assert TCA_LENGTH_SOURCE in torch.compiler.config.dynamic_sources.split(",")
    torch.testing.assert_close(compiled(x).logits, eager, atol=1e-4, rtol=1e-4)


# The budgets' calibration config, and for each TCAConfig field a different valid value.
CALIBRATED = TCAConfig(block_size=32, window=128, tau=0.8, mass_criterion="lse", mass_quantile=0.2,
                       guard_floor=0.5)
OTHER_VALUES = {
    "block_size": st.sampled_from([16, 64]), "window": st.sampled_from([64, 256]), "tau": st.floats(0.0, 1.0),
    "alpha": st.floats(0.0, 1.0), "num_candidates": st.integers(1, 64), "sigma": st.floats(0.01, 10.0),
    "gqa_aggregation": st.just("max"), "num_observation_queries": st.integers(1, 64),
    "normalize_redundancy": st.just(True), "min_sparse_length": st.integers(0, 10**5),
    "mass_criterion": st.just("column_mean"), "mass_quantile": st.none() | st.floats(0.0, 1.0),
    "guard_floor": st.none() | st.floats(0.0, 1.0), "pool_kernel": st.sampled_from([3, 5, 7]),
    "span": st.integers(1, 8), "spread_observation_queries": st.integers(1, 64), "anchor_blocks": st.integers(1, 99),
    "grace_blocks": st.integers(1, 4), "cache_spread_observation_queries": st.integers(0, 64),
}


def test_every_config_field_is_covered():
    assert set(OTHER_VALUES) | {"version"} == {f.name for f in dataclasses.fields(TCAConfig)}


@given(data=st.data())
def test_apply_refuses_a_config_the_budgets_were_not_calibrated_with(data):
    name = data.draw(st.sampled_from(sorted(OTHER_VALUES)))
    value = data.draw(OTHER_VALUES[name].filter(lambda v: v != getattr(CALIBRATED, name)))
    changes = {name: value, "window": max(128, value)} if name == "block_size" else {name: value}
    if name == "mass_criterion":  # column_mean takes no quantile
        changes["mass_quantile"] = None
    config = CALIBRATED.replace(**changes)
    budgets = HeadBudgets.uniform(2, 2, float(data.draw(st.floats(0.0, 1.0))), CALIBRATED)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    # Only the dense/sparse threshold, decode's grace, the cache's own selection and a higher guard leave
    # what calibration measured (the prefill) intact.
    free = name in ("min_sparse_length", "grace_blocks", "cache_spread_observation_queries") or (
        name == "guard_floor" and value is not None and value >= 0.5)
    if free:
        tca_flex.apply(model, config, budgets=budgets)
        assert tca_flex.integration.applied_budgets(model).config == config
        assert torch.equal(tca_flex.integration.applied_budgets(model).probs, budgets.probs)
        tca_flex.remove(model)
        return
    named = re.escape(f"{name} (config {value!r}, budgets {getattr(CALIBRATED, name)!r}")
    with pytest.raises(ValueError, match=named):
        tca_flex.apply(model, config, budgets=budgets)
    assert not tca_flex.integration.is_applied(model)


def test_with_config_overrides_the_budgets_knobs_with_a_warning(tiny_llama, caplog):
    budgets = HeadBudgets.uniform(2, 2, 0.3, CALIBRATED)
    config = CALIBRATED.replace(alpha=0.25, sigma=3.0, min_sparse_length=7)
    with caplog.at_level(logging.WARNING, logger="tca_flex.budgets"):
        tca_flex.apply(tiny_llama, budgets=budgets.with_config(config))
    assert "alpha (config 0.25, budgets 0.5)" in caplog.text and "sigma (config 3.0, budgets 0.5)" in caplog.text
    assert "min_sparse_length" not in caplog.text  # a run-time knob: nothing to warn about
    assert tca_flex.integration.applied_budgets(tiny_llama).config == config
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tca_flex.budgets"):
        assert budgets.with_config(min_sparse_length=9).config.min_sparse_length == 9
    assert not caplog.text
    with pytest.raises(ValueError, match="block of 32"):
        budgets.with_config(block_size=16)


def test_forward_with_autograd_on_runs_detached_and_says_so(tiny_llama):
    """TCA is inference-only: outside torch.no_grad() the sparse path still runs, detached, with a warning."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    x, steps = ids(300, seed=seed), ids(3, seed=seed + 1)
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.25, SPARSE))

    def run(cache):
        logits = [tiny_llama(x, use_cache=True, **cache_kwargs(tiny_llama, cache)).logits]
        for i in range(steps.shape[1]):  # pruned-cache decode steps
            logits.append(tiny_llama(steps[:, i:i + 1], use_cache=True, **cache_kwargs(tiny_llama, cache)).logits)
        return logits

    with torch.no_grad():
        want = run(tca_flex.TCACache(tiny_llama))
    cache = tca_flex.TCACache(tiny_llama)
    with pytest.warns(UserWarning, match="inference-only.*detached.*torch.no_grad"):
        got = run(cache)
    assert not any(t.requires_grad for layer in cache.layers for t in vars(layer).values()
                   if isinstance(t, torch.Tensor))  # no autograd history kept across steps
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.detach(), w, atol=1e-6, rtol=1e-6)
    got[0].sum().backward()
    # Queries reach the output only through TCA attention, which is detached; the MLPs still learn.
    assert all(layer.self_attn.q_proj.weight.grad is None for layer in tiny_llama.model.layers)
    assert all(layer.mlp.up_proj.weight.grad.abs().sum() > 0 for layer in tiny_llama.model.layers)


@torch.no_grad()
def test_what_tca_layers_cannot_give_is_said_or_refused(tiny_llama):
    """No attention weights (output_attentions) is said; attention dropout in training mode is refused,
    in the sparse prefill and in a step over the pruned cache alike."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.25, SPARSE))
    x = ids(300, seed=seed)
    with pytest.warns(UserWarning, match="no attention weights.*output_attentions"):
        out = tiny_llama(x, output_attentions=True)
    assert torch.equal(out.logits, tiny_llama(x).logits)  # said, and nothing else changes
    cache = tca_flex.TCACache(tiny_llama)
    tiny_llama(x, use_cache=True, **cache_kwargs(tiny_llama, cache))
    for layer in tiny_llama.model.layers:
        layer.self_attn.attention_dropout = 0.1
    tiny_llama.train()
    try:
        with pytest.raises(ValueError, match="inference-only: call model.eval"):
            tiny_llama(x)
        with pytest.raises(ValueError, match="inference-only: call model.eval"):
            tiny_llama(ids(1, seed=seed + 1), use_cache=True, **cache_kwargs(tiny_llama, cache))
    finally:
        tiny_llama.eval()


@torch.no_grad()
def test_decode_over_a_cache_that_is_not_pruned_says_so(tiny_llama):
    """Without a TCACache, generate's own cache keeps every token: a warning names the fix; with a
    TCACache, or a prompt the window covers (nothing to prune), there is nothing to say."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.25, SPARSE))
    long, short = ids(300, seed=seed), ids(SPARSE.dense_up_to - 8, seed=seed + 1)
    with pytest.warns(UserWarning, match="not a TCACache.*every token's K/V is kept.*cache=tca_flex.TCACache"):
        tiny_llama.generate(long, max_new_tokens=2, do_sample=False)
    for prompt, cache in ((long, tca_flex.TCACache(tiny_llama)), (short, None)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            tiny_llama.generate(prompt, max_new_tokens=2, do_sample=False, **cache_kwargs(tiny_llama, cache))
        assert not [w for w in seen if "not a TCACache" in str(w.message)]


@torch.no_grad()
def test_a_static_cache_says_tca_does_not_run(tiny_llama):
    """transformers' StaticCache gives every call keys of the cache's whole length, so no call is a
    prefill the sparse path can take: the model runs dense, and says so (forward and generate)."""
    from transformers import StaticCache

    seed = int(torch.randint(0, 2**31 - 1, ()))
    x = ids(300, seed=seed)
    dense = tiny_llama(x, **cache_kwargs(tiny_llama, StaticCache(config=tiny_llama.config, max_cache_len=320))).logits
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.25, SPARSE))
    assert (tiny_llama(x).logits - dense).abs().max() > 1e-4  # TCA's prefill without a cache
    said = "fixed-size cache.*StaticCache.*TCA cannot run.*cache=tca_flex.TCACache"
    with pytest.warns(UserWarning, match=said):
        out = tiny_llama(x, **cache_kwargs(tiny_llama, StaticCache(config=tiny_llama.config, max_cache_len=320)))
    torch.testing.assert_close(out.logits, dense)
    with pytest.warns(UserWarning, match=said):
        tiny_llama.generate(x, max_new_tokens=2, do_sample=False, cache_implementation="static")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pruned = tca_flex.TCACache(tiny_llama)
        tiny_llama.generate(x, max_new_tokens=2, do_sample=False, **cache_kwargs(tiny_llama, pruned))
    assert not [w for w in seen if "fixed-size" in str(w.message)]


def registered(name):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return name in ALL_ATTENTION_FUNCTIONS.valid_keys(), name in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys()


@pytest.fixture
def no_other_applied_models(monkeypatch):
    """Earlier tests' applied models may still be alive (torch.compile caches hold them), and "tca" rightly
    stays registered while one is: track only this test's models."""
    import weakref

    monkeypatch.setattr(tca_flex.integration, "_APPLIED", weakref.WeakSet())


@torch.no_grad()
def test_models_sharing_a_config_object_stay_dense_and_remove_unregisters(no_other_applied_models):
    shared = tiny_llama_config()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    first, second, third = (LlamaForCausalLM(shared).eval() for _ in range(3))
    assert first.config is second.config is shared  # what transformers does with one config object
    x = ids(300, seed=int(torch.randint(0, 2**31 - 1, ())))
    dense = [m(x).logits for m in (first, second)]
    tca_flex.apply(first, budgets=HeadBudgets.uniform(2, 2, 0.1, SPARSE))
    tca_flex.apply(third, budgets=HeadBudgets.uniform(2, 2, 0.1, SPARSE))
    assert shared._attn_implementation == "sdpa" and first.config is not shared
    assert torch.equal(second(x).logits, dense[1])  # untouched: its own dense attention
    later = LlamaForCausalLM(shared).eval()  # built from the shared object after apply
    later.load_state_dict(second.state_dict())
    assert torch.equal(later(x).logits, dense[1])
    assert (first(x).logits - dense[0]).abs().max() > 1e-4  # the sparse path ran
    tca_flex.remove(first)
    assert first.config is shared and all(m.config is shared for m in first.modules() if "config" in m.__dict__)
    assert torch.equal(first(x).logits, dense[0])
    assert registered("tca") == (True, True)  # the third model still runs TCA
    third(x)
    tca_flex.remove(third)
    assert registered("tca") == (False, False)


@torch.no_grad()
def test_a_deep_copy_runs_tca_after_its_original_is_removed(no_other_applied_models):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    original = tca_flex.apply(LlamaForCausalLM(tiny_llama_config()).eval(),
                              budgets=HeadBudgets.uniform(2, 2, 0.1, SPARSE))
    x = ids(300, seed=int(torch.randint(0, 2**31 - 1, ())))
    sparse = original(x).logits
    clone = copy.deepcopy(original)
    tca_flex.remove(original)
    assert registered("tca") == (True, True)  # the copy still dispatches to it
    assert torch.equal(clone(x).logits, sparse)
    tca_flex.remove(clone)
    assert registered("tca") == (False, False)
    assert torch.equal(clone(x).logits, original(x).logits)  # both dense again


@torch.no_grad()
def test_calibration_and_reports_leave_no_names_registered(tiny_llama, no_other_applied_models):
    tca_flex.calibrate(tiny_llama, ids(128 + 4 * 32, seed=3), SPARSE, progress=False)
    assert registered("tca_calibration") == (False, False)
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.25, SPARSE))
    tca_flex.report(tiny_llama, ids(300, seed=4))
    tca_flex.remove(tiny_llama)
    assert registered("tca_fidelity") == (False, False) and registered("tca") == (False, False)


def test_apply_without_arguments_takes_the_best_known_defaults(tiny_llama, caplog):
    """No budgets, no config: shipped budgets when the model's family and shape match them,
    otherwise uniform budgets with the TCAConfig.accurate() knobs, and a warning either way."""
    with caplog.at_level("WARNING", logger="tca_flex.integration"):
        tca_flex.apply(tiny_llama)
    budgets = tca_flex.integration.applied_budgets(tiny_llama)
    assert budgets.config == TCAConfig.accurate()
    assert "calibrate per-head budgets" in caplog.text
    caplog.clear()
    shipped = tca_flex.shipped_budgets("smollm2")
    # SmolLM2's attention shape (30 layers, 9 query / 3 KV heads of 64) on a tiny random body.
    lookalike = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=30, num_attention_heads=9,
                                                   num_key_value_heads=3, head_dim=64, hidden_size=72)).eval()
    with caplog.at_level("WARNING", logger="tca_flex.integration"):
        tca_flex.apply(lookalike)
    chosen = tca_flex.integration.applied_budgets(lookalike)
    assert torch.equal(chosen.probs, shipped.probs) and chosen.config == shipped.config
    assert "shipped budgets 'smollm2'" in caplog.text
    tca_flex.remove(lookalike)
    tca_flex.apply(lookalike, TCAConfig())  # an explicit config is never replaced
    assert tca_flex.integration.applied_budgets(lookalike).config == TCAConfig()


@torch.no_grad()
def test_arguments_of_the_wrong_kind_are_refused_before_any_work(tiny_llama):
    """Each call names the argument and what it takes, before running the model (no raw error from
    deep inside torch or transformers)."""
    from transformers import DynamicCache

    x = ids(300, seed=int(torch.randint(0, 2**31 - 1, ())))
    with pytest.raises(TypeError, match="calibrate: config must be a TCAConfig"):
        tca_flex.calibrate(tiny_llama, x, {"window": 32})
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.25, SPARSE))
    for dtype in (torch.float64, torch.int64):
        with pytest.raises(TypeError, match=f"warmup: dtype {dtype} is not one TCA runs in"):
            tca_flex.warmup(tiny_llama, max_length=400, dtype=dtype, progress=False)
    for chunk in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="chunk must be an int >= 1"):
            tca_flex.report(tiny_llama, x, chunk=chunk)
    with pytest.raises(ValueError, match=r"shape \[1, L\] with L >= 1"):
        tca_flex.report(tiny_llama, x[:, :0])
    for reserve in (1.5, True, "8"):
        with pytest.raises(ValueError, match="reserve_tokens must be an int >= 0"):
            tca_flex.TCACache(tiny_llama, reserve_tokens=reserve)
    for width in (x.shape[1] - 10, x.shape[1] + 10):
        with pytest.raises(ValueError, match=f"attention_mask has {width} positions but this prefill has 300 tokens"):
            tiny_llama(x, attention_mask=torch.ones(1, width, dtype=torch.long))
    with pytest.raises(TypeError, match="fills a tca_flex.TCACache.*got DynamicCache"):
        tca_flex.prefill_by_reconstruction(tiny_llama, x, DynamicCache(config=tiny_llama.config), x[:, -8:])
