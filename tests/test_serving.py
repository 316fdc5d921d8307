"""Compile once, serve any prompt length: graph counts, the warm-up, the on-disk caches."""

import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import tca_flex
from tca_flex import HeadBudgets, TCAConfig
from tca_flex.hfcompat import cache_kwargs
from tca_flex.integration import attention_routed
from tca_flex.reference import reference_attention, reference_importance, reference_keep, reference_mask

from .oracles import ReferenceModel

CONFIG = TCAConfig(block_size=16, window=64)
# Distinct lengths, none a multiple of the 128-wide kernel tile or of the block; every one
# keeps each symbolic size >= 2 (dynamo specialises sizes 0 and 1).
LENGTHS = [211, 250, 263, 301, 347, 389, 402, 455, 498, 541]


def _reference_forward(budgets: HeadBudgets):
    """An attention function computing TCA from the float64 reference, for ``attention_routed``."""

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        length = key.shape[2]
        keep = torch.zeros(key.shape[0], key.shape[1], length, dtype=torch.bool)
        if length > CONFIG.window:
            s = reference_importance(query, key, scaling, CONFIG.num_observation_queries)
            keep = reference_keep(s, budgets.probs[module.layer_idx], CONFIG.selection)
        mask = reference_mask(keep, min(CONFIG.window, length), query.shape[1])
        out = reference_attention(query, key, value, mask, scaling)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return forward


@pytest.mark.parametrize("compiled_selection", [False, True], ids=["cpu_route", "cuda_route"])
@torch.no_grad()
def test_ten_prompt_lengths_compile_once_and_match_the_reference(tiny_llama, monkeypatch, compiled_selection):
    """Through the model (its projections' layout, the custom op): after the first sparse prefill no
    length compiles anything. ``cuda_route`` compiles the selection as CUDA does; a view of the
    queries that kept a length-dependent stride once made that graph compile at every length."""
    import tca_flex.attention

    if compiled_selection:
        monkeypatch.setattr(tca_flex.attention, "compiles_selection", lambda q: not torch.compiler.is_compiling())
    torch._dynamo.reset()
    budgets = HeadBudgets.uniform(2, 2, 0.3, CONFIG)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (1, n), generator=gen) for n in LENGTHS]
    with attention_routed(tiny_llama, "tca_test_reference", _reference_forward(budgets)):
        want = [tiny_llama(x).logits for x in prompts]
    tca_flex.apply(tiny_llama, budgets=budgets)
    before = counters["stats"]["unique_graphs"]
    got = [tiny_llama(prompts[0]).logits]
    # The first sparse prefill compiles the packed attention, and on the CUDA route the
    # selection: one graph each; no later length compiles anything (docs/serving.md).
    assert counters["stats"]["unique_graphs"] - before == 1 + compiled_selection
    with torch._dynamo.config.patch(error_on_recompile=True):
        got += [tiny_llama(x).logits for x in prompts[1:]]
    for n, g, w in zip(LENGTHS, got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"length {n}: {m}")


@pytest.mark.parametrize("config", [TCAConfig.accurate(block_size=16, window=64, anchor_blocks=30, guard_floor=0.9,
                                                       span=1),
                                    TCAConfig.accurate(block_size=16, window=64, cache_spread_observation_queries=0),
                                    TCAConfig(block_size=16, window=64)], ids=["accurate", "cache-last", "paper"])
def test_compiled_selection_is_length_generic(config):
    """The CUDA path compiles the selection too: one graph for every length (checked on the CPU),
    fed only the observation queries' rows, and equal to the selection over every query. The
    queries are laid out as a model's projections hand them over (``[B, L, H, D]`` transposed):
    the paper's single observation row was once a view keeping the batch stride ``L * H * D``,
    and the graph compiled again for every length."""
    from tca_flex.attention import _select_positions, cache_queries, cache_selection, tca_select
    from tca_flex.compile import length_generic
    from tca_flex.masks import KERNEL_BLOCK, key_positions
    from tca_flex.selection import observed_queries

    torch._dynamo.reset()  # the other config's graph would otherwise count as this one's recompile
    probs = torch.rand(2, config.block_size + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cdf = HeadBudgets(probs=(probs / probs.sum(-1, keepdim=True)).unsqueeze(0), config=config).cdf(0)
    select = length_generic(_select_positions, (1, 2))
    gen = torch.Generator().manual_seed(4)
    for i, n in enumerate(LENGTHS[:6]):
        q, k = torch.randn(1, n, 4, 8, generator=gen).transpose(1, 2), torch.randn(1, 2, n, 8, generator=gen)
        q_obs = observed_queries(q, config.num_observation_queries, config.spread_observation_queries,
                                 config.window)
        q_cache = cache_queries(q, config)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            positions, counts, table, kept, kept_counts = select(q_obs, k, cdf, config, 8 ** -0.5, q_cache)
        want = tca_select(q, k, cdf, config, 8 ** -0.5)
        assert torch.equal(positions, want.positions) and torch.equal(counts, want.counts), n
        assert torch.equal(table, key_positions(want.positions, -(-n // KERNEL_BLOCK) * KERNEL_BLOCK)), n
        want = cache_selection(q, k, cdf, config, 8 ** -0.5)
        assert torch.equal(kept, want.positions) and torch.equal(kept_counts, want.counts), n
    # The cache's rows are the config's to choose: rows that do not match it are refused, never ignored.
    wrong = observed_queries(q, config.num_observation_queries) if q_cache is None else None
    with pytest.raises(ValueError, match="q_cache must be cache_queries"):
        _select_positions(q_obs, k, cdf, config, 8 ** -0.5, wrong)


def _row_max_of_outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.unsqueeze(-1) * b.unsqueeze(-2)).amax(-1)


def test_length_generic_keeps_every_marked_dim_of_an_argument():
    """Two symbolic dims of one argument (a block mask's ``[.., q tiles, k tiles]`` table): both stay
    symbolic, so no later shape compiles again (an alias per mark once dropped the first dim's)."""
    from tca_flex.compile import length_generic

    fn = length_generic(_row_max_of_outer, (0, 0), (0, 1), (1, 0), (1, 1))
    gen = torch.Generator()
    gen.seed()  # fresh inputs each run
    for i, (n, m) in enumerate(((5, 7), (9, 4), (13, 11))):
        a, b = torch.randn(n, m, generator=gen), torch.randn(n, m, generator=gen)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = fn(a, b)
        torch.testing.assert_close(got, _row_max_of_outer(a, b))


@torch.no_grad()
def test_warmup_compiles_ahead_and_leaves_no_global_change(tiny_llama):
    limit = torch._dynamo.config.recompile_limit
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.3, CONFIG))
    report = tca_flex.warmup(tiny_llama, max_length=900, progress=False)
    assert report.lengths[0] > CONFIG.window and report.lengths[-1] == 900 and math.isfinite(report.seconds)
    assert "decode step" in report.compiled and str(report).startswith("tca_flex warm-up")
    gen = torch.Generator().manual_seed(9)
    reference = ReferenceModel(HeadBudgets.uniform(2, 2, 0.3, CONFIG), pruned=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (333, 700, 871):
            x = torch.randint(0, 256, (1, n), generator=gen)
            out = tiny_llama.generate(x, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                                      output_logits=True, **cache_kwargs(tiny_llama, tca_flex.TCACache(tiny_llama)))
            # The warmed graphs compute what the float64 model that prunes by hand does.
            want = reference.logits(tiny_llama, out.sequences, n)
            torch.testing.assert_close(torch.stack(out.logits, 1), want.float(), atol=1e-4, rtol=1e-4)
    assert torch._dynamo.config.recompile_limit == limit
    with pytest.raises(ValueError, match="no room above the window"):
        tca_flex.warmup(tiny_llama, max_length=100)


@torch.no_grad()
def test_warmup_generate_compiles_the_step_once_for_every_later_request(tiny_llama):
    """``warmup(generate=True)`` compiles, once, the decode step that ``generate`` compiles by itself
    over a ``TCACache`` with reserved room (on the CPU forced, with aot_eager: dynamo's guards are
    what is tested): afterwards requests of new lengths, reserves (one below the answer's length, within
    the buffers' headroom) and answer lengths compile nothing, and their tokens equal eager ``generate``'s.
    A generation that outgrows reserve and headroom re-lays its buffers (its tokens still equal eager
    ``generate``'s), and the cache says so once for the request."""
    import random

    from transformers import CompileConfig

    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.3, CONFIG))
    config = CompileConfig(backend="aot_eager", mode=None)
    config._compile_all_devices = True
    sources_before = torch.compiler.config.dynamic_sources
    torch._dynamo.reset()
    try:
        tca_flex.warmup(tiny_llama, max_length=900, progress=False)  # the prefill's graphs
        report = tca_flex.warmup(tiny_llama, max_length=900, generate=True, compile_config=config, progress=False)
        assert "generate's compiled decode step" in report.compiled and math.isfinite(report.generate_seconds)
        # One compile of the step, its sizes symbolic from the start (left to itself, generate
        # compiles it three times: first step, second step, second prompt length).
        assert report.graphs == 1
        assert torch.compiler.config.dynamic_sources == sources_before  # patched for the warm-up only
        assert hasattr(tiny_llama, "_compiled_call")
        gen = torch.Generator().manual_seed(random.randrange(2**31))  # fresh prompts each run
        for n, new, reserve in ((347, 30, 40), (541, 21, 100), (263, 40, 8)):
            x = torch.randint(0, 256, (1, n), generator=gen)
            kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)
            want = tiny_llama.generate(x, **kwargs, **cache_kwargs(tiny_llama, tca_flex.TCACache(tiny_llama)))
            cache = tca_flex.TCACache(tiny_llama, reserve_tokens=reserve)
            with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = tiny_llama.generate(x, **kwargs, compile_config=config, **cache_kwargs(tiny_llama, cache))
            torch.testing.assert_close(got, want, atol=0, rtol=0)
            assert not cache.regrew and not [w for w in caught if "outgrew" in str(w.message)]
        x = torch.randint(0, 256, (1, 300), generator=gen)
        kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=150, min_new_tokens=150, do_sample=False,
                      pad_token_id=0)
        want = tiny_llama.generate(x, **kwargs, **cache_kwargs(tiny_llama, tca_flex.TCACache(tiny_llama)))
        cache = tca_flex.TCACache(tiny_llama, reserve_tokens=8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = tiny_llama.generate(x, **kwargs, compile_config=config, **cache_kwargs(tiny_llama, cache))
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        # Said once for the request, however many re-lays it took.
        assert sum("outgrew the room reserve_tokens=8" in str(w.message) for w in caught) == 1
        prefilled = tca_flex.TCACache(tiny_llama, reserve_tokens=8)
        tiny_llama.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False, pad_token_id=0,
                            **cache_kwargs(tiny_llama, prefilled))
        assert cache.layers[0].k_buf.shape[1] > prefilled.layers[0].k_buf.shape[1], "the buffers did not regrow"
        assert cache.regrew and not prefilled.regrew  # what a server can log
    finally:
        torch._dynamo.reset()


def test_warmup_generate_refuses_where_generate_compiles_nothing(tiny_llama):
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.3, CONFIG))
    with pytest.raises(ValueError, match="accelerators only"):
        tca_flex.warmup(tiny_llama, max_length=900, generate=True, progress=False)
    tiny_llama.generation_config.disable_compile = True
    with pytest.raises(ValueError, match="disable_compile"):
        tca_flex.warmup(tiny_llama, max_length=900, generate=True, progress=False)


def test_warmup_refuses_a_model_without_apply(tiny_llama):
    with pytest.raises(ValueError, match=r"call tca_flex.apply\(model\) first"):
        tca_flex.warmup(tiny_llama, max_length=900)


def test_a_damaged_compile_cache_is_said(tmp_path, caplog):
    path = tmp_path / "compiled.bin"
    path.write_bytes(bytes(torch.randint(0, 256, (64,), dtype=torch.uint8).tolist()))
    with caplog.at_level("WARNING", logger="tca_flex.warmup"):
        tca_flex.load_compile_cache(path)
    assert "nothing was loaded" in caplog.text and str(path) in caplog.text


_SECOND_PROCESS = """
import sys, torch, tca_flex
from tca_flex import HeadBudgets, TCAConfig
from transformers import LlamaForCausalLM
from tests.conftest import tiny_llama_config
tca_flex.load_compile_cache(sys.argv[1])
torch.manual_seed(1234)
model = LlamaForCausalLM(tiny_llama_config()).eval()
tca_flex.apply(model, budgets=HeadBudgets.uniform(2, 2, 0.3, TCAConfig(block_size=16, window=64)))
with torch.no_grad():
    print(" ".join(repr(float(x)) for x in model(torch.arange(420).remainder(256)[None]).logits[0, -1]))
"""


@torch.no_grad()
def test_saved_compile_cache_loads_in_a_second_process(tiny_llama, tmp_path):
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.3, CONFIG))
    tca_flex.warmup(tiny_llama, max_length=700, decode=False, progress=False)
    path = tca_flex.save_compile_cache(tmp_path / "compiled.bin")
    assert path.stat().st_size > 0
    want = tiny_llama(torch.arange(420).remainder(256)[None]).logits[0, -1]
    done = subprocess.run([sys.executable, "-c", _SECOND_PROCESS, str(path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nothing was loaded" not in done.stderr, done.stderr[-2000:]  # load_compile_cache's warning
    got = torch.tensor([float(x) for x in done.stdout.strip().splitlines()[-1].split()])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not tca_flex.decode.triton_supported(torch.empty(1, 1, 1, 16)),
                    reason="needs Triton's interpreter (a machine without a GPU)")
@torch.no_grad()
def test_warmup_generate_compiles_the_triton_decode_step_once(tiny_llama, monkeypatch):
    """The GPU's decode route through ``warmup(generate=True)``: the Triton kernels take the cache
    layout's slot counts as Python ints (their grid sizes), which differ per request. Taken here on
    the CPU (Triton's interpreter; the rule "auto" follows on CUDA), the step compiles once in the
    warm-up, a request of a new length compiles nothing, and its tokens equal eager ``generate``'s."""
    import random

    from transformers import CompileConfig

    import tca_flex.cache as cache_module
    import tca_flex.decode as decode

    real = decode.resolve_backend

    def cuda_rule(q, segments, backend="auto"):
        if backend == "auto" and segments is not None and decode.triton_supported(q):
            return "triton"
        return real(q, segments, backend)

    monkeypatch.setattr(decode, "resolve_backend", cuda_rule)
    monkeypatch.setattr(cache_module, "resolve_backend", cuda_rule)
    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.3, CONFIG))
    config = CompileConfig(backend="aot_eager", mode=None)
    config._compile_all_devices = True
    torch._dynamo.reset()
    try:
        tca_flex.warmup(tiny_llama, max_length=900, progress=False)  # the prefill's graphs
        report = tca_flex.warmup(tiny_llama, max_length=900, generate=True, compile_config=config, progress=False)
        assert report.graphs == 1
        steps = counters["stats"]["unique_graphs"]
        launches, launch = [], decode.triton_decode.launch
        monkeypatch.setattr(decode.triton_decode, "launch", lambda *a, **k: launches.append(1) or launch(*a, **k))
        gen = torch.Generator().manual_seed(random.randrange(2**31))  # a fresh prompt each run
        x = torch.randint(0, 256, (1, random.choice([263, 301, 347])), generator=gen)
        kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                      pad_token_id=0)
        want = tiny_llama.generate(x, **kwargs, **cache_kwargs(tiny_llama, tca_flex.TCACache(tiny_llama)))
        cache = tca_flex.TCACache(tiny_llama, reserve_tokens=16)
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = tiny_llama.generate(x, **kwargs, compile_config=config, **cache_kwargs(tiny_llama, cache))
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert counters["stats"]["unique_graphs"] == steps
        assert launches, "the decode steps did not take the Triton kernels"
    finally:
        torch._dynamo.reset()


@torch.no_grad()
def test_generate_says_once_a_cache_when_it_decodes_eagerly_on_a_gpu(tiny_llama, monkeypatch):
    """On CUDA ``generate`` compiles no step for a ``TCACache`` made without ``reserve_tokens``: its eager
    decode is often slower per token than eager dense, which the first decode step of each such cache says,
    with what turns the compiled path on. Not for a reserved cache, and not on the CPU, where
    ``generate`` compiles for no cache."""
    from tca_flex import generate_hook

    tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 2, 0.3, CONFIG))
    ids = torch.randint(1, 256, (1, 100))

    def hints(cache: tca_flex.TCACache) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # two requests through one cache
                cache.reset()
                tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, **cache_kwargs(tiny_llama, cache))
        return sum("decodes this TCACache eagerly" in str(w.message) for w in caught)

    assert hints(tca_flex.TCACache(tiny_llama)) == 0  # the CPU
    monkeypatch.setattr(generate_hook, "_on_gpu", lambda cache: True)
    assert hints(tca_flex.TCACache(tiny_llama)) == 1
    assert hints(tca_flex.TCACache(tiny_llama)) == 1  # once a cache
    assert hints(tca_flex.TCACache(tiny_llama, reserve_tokens=8)) == 0
