import pytest
import torch
from transformers import LlamaForCausalLM

import tca_flex
from tca_flex import HeadBudgets, TCAConfig
from tca_flex.attention import tca_prefill_attention
from tca_flex.hfcompat import cache_kwargs

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
    padded[0, :7] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="padded"):
        tiny_llama(ids(300, bsz=2), attention_mask=padded)
    tca_flex.remove(tiny_llama)
    with pytest.raises(ValueError, match="3 layers x 2 KV heads"):
        tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(3, 2, 0.5, SPARSE))
    with pytest.raises(ValueError, match="block_size"):
        tca_flex.apply(tiny_llama, TCAConfig(block_size=64, window=128),
                       budgets=HeadBudgets.uniform(2, 2, 0.5, SPARSE))
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
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2))
    with pytest.raises(ValueError, match="encoder-decoder"):
        tca_flex.apply(t5)


@torch.no_grad()
def test_float64_model_gets_a_clear_error(tiny_llama):
    tca_flex.apply(tiny_llama.double(), SPARSE)
    with pytest.raises(TypeError, match="supports"):
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
    padded = tca_mask(2, 64, 64, attention_mask=padding, **kw)
    assert padded is not None and not padded[0, 0, 10, :5].any() and padded[1, 0, 10, :11].all()


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
def test_tca_flex_compile_wraps_torch_compile(tiny_llama):
    from tca_flex.compile import compiled_flex_attention  # the module stays importable beside the function

    assert callable(compiled_flex_attention)
    with pytest.raises(ValueError, match="apply"):
        tca_flex.compile(tiny_llama)
    x = ids(300)
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.3, SPARSE))
    eager = tiny_llama(x).logits
    compiled = tca_flex.compile(tiny_llama, backend="aot_eager")
    assert torch._dynamo.config.recompile_limit >= 64
    torch.testing.assert_close(compiled(x).logits, eager, atol=1e-4, rtol=1e-4)
