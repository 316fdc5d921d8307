"""Fidelity report and runtime guard: gamma against float64 softmax, Theorem 1's bound, the guard's floor."""

import json

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from transformers import AttentionInterface, LlamaForCausalLM

import tca_flex
from tca_flex import HeadBudgets, TCAConfig
from tca_flex.attention import tca_attention_forward, tca_prefill_attention
from tca_flex.config import SelectionConfig
from tca_flex.fidelity import FidelityReport, layer_fidelity, query_positions
from tca_flex.reference import causal_mask, reference_attention, reference_importance, reference_mask
from tca_flex.selection import guard_keep, last_query_probs, select

from .conftest import tiny_llama_config
from .oracles import reference_selection

SPARSE = TCAConfig(block_size=32, window=128)
LENGTH = 300  # one sequence length for every tiny-Llama test: FlexAttention compiles once


def dense_probs(q, k, scaling):
    """float64 ``[B, H_q, L, L]`` causal softmax and the causal mask."""
    g = q.shape[1] // k.shape[1]
    logits = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scaling
    mask = causal_mask(q.shape[2], k.shape[2])
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), -1), mask


def reference_gamma(q, k, keep, window, scaling):
    """float64 ``[B, H_q, L]``: dropped mass of every query, straight from the softmax."""
    p, _ = dense_probs(q, k, scaling)
    return (p * ~reference_mask(keep, window, q.shape[1])).sum(-1)


def random_layer(seed, hkv, group, length, d, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hkv * group, length, d, generator=g) * spread
    k = torch.randn(1, hkv, length, d, generator=g) * spread
    v = torch.randn(1, hkv, length, d, generator=g) + 0.5  # nonzero mean: max|V| is not symmetric
    return q, k, v


def run_select(q, k, config, frac, guard_floor=None):
    budgets = HeadBudgets.uniform(1, k.shape[1], frac, config)
    knobs = SelectionConfig(block_size=config.block_size, window=config.window, alpha=config.alpha,
                            guard_floor=guard_floor)
    return select(q, k, budgets.cdf(0), knobs, scaling=q.shape[-1] ** -0.5, capacity_multiple=16)


layers = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "hkv": st.integers(1, 2),
    "group": st.sampled_from([1, 2, 3]),
    "d": st.sampled_from([4, 8, 16]),
    "block": st.sampled_from([8, 16]),
    "win_blocks": st.integers(1, 2),
    "extra": st.integers(1, 60),
    "frac": st.floats(0.0, 1.0),
    "queries": st.one_of(st.sampled_from(["last", "all"]), st.integers(1, 12)),
    "random_keep": st.booleans(),
})


@given(layers)
@example({"seed": 5, "hkv": 2, "group": 2, "d": 8, "block": 8, "win_blocks": 1, "extra": 40, "frac": 0.0,
          "queries": "all", "random_keep": False})
def test_layer_gamma_equals_float64_softmax_and_bound_holds(p):
    q, k, v = random_layer(p["seed"], p["hkv"], p["group"], p["block"] * p["win_blocks"] + p["extra"], p["d"])
    length, scale = q.shape[2], p["d"] ** -0.5
    config = TCAConfig(block_size=p["block"], window=p["block"] * p["win_blocks"])
    if p["random_keep"]:  # any kept set, not only TCA's
        keep = torch.rand(k.shape[:3], generator=torch.Generator().manual_seed(p["seed"])) < p["frac"]
    else:
        keep = reference_selection(q, k, HeadBudgets.uniform(1, p["hkv"], p["frac"], config).probs[0], config)[1]
    pos = query_positions(length, p["queries"])
    sparse_ref = reference_attention(q, k, v, reference_mask(keep, config.window, q.shape[1]), scale)
    # A stand-in kernel output that is *not* the sparse result: kernel_diff must measure it against dense.
    # (The real kernel is checked against float64 in test_kernel_output_against_float64_reference.)
    noise = torch.randn(sparse_ref.shape, generator=torch.Generator().manual_seed(p["seed"] + 1), dtype=torch.float64)
    kernel_out = (sparse_ref + 1e-2 * noise).float()
    lf = layer_fidelity(q, k, v, keep, config.window, scale, pos, out_bhsd=kernel_out, chunk=7)

    gamma_ref = reference_gamma(q, k, keep, config.window, scale)[0][:, pos]
    torch.testing.assert_close(lf.gamma.double(), gamma_ref, atol=2e-5, rtol=0)
    # Measured change against float64, and Theorem 1 on both sides.
    causal = causal_mask(length, length).expand(1, q.shape[1], length, length)
    dense_ref = reference_attention(q, k, v, causal, scale)
    diff_ref = (sparse_ref - dense_ref).abs().amax(-1)[0][:, pos]
    torch.testing.assert_close(lf.diff.double(), diff_ref, atol=1e-5, rtol=1e-4)
    kernel_diff_ref = (kernel_out.double() - dense_ref).abs().amax(-1)[0][:, pos]
    torch.testing.assert_close(lf.kernel_diff.double(), kernel_diff_ref, atol=1e-5, rtol=1e-4)
    max_v = v.abs().amax((-2, -1))[0].repeat_interleave(p["group"]).unsqueeze(-1)
    assert (diff_ref <= 2 * gamma_ref * max_v.double() + 1e-12).all()
    assert (lf.diff <= 2 * lf.gamma * max_v + 1e-5).all()
    assert torch.equal(lf.max_abs_v, v[0].abs().amax((-2, -1)))
    cached = keep[0].clone()
    cached[:, length - config.window:] = True
    torch.testing.assert_close(lf.kept_fraction, cached.float().mean(-1))
    if p["frac"] == 0.0 and p["queries"] == "all":
        assert lf.gamma.max() > 1e-3  # the pinned example really drops mass


def test_dense_layer_reports_zero():
    q, k, v = random_layer(11, 2, 2, 50, 8)
    lf = layer_fidelity(q, k, v, None, 64, 8 ** -0.5, query_positions(50, "all"))
    assert torch.equal(lf.gamma, torch.zeros(4, 50)) and torch.equal(lf.diff, torch.zeros(4, 50))
    assert torch.equal(lf.kept_fraction, torch.ones(2)) and not lf.sparse
    assert lf.kernel_diff.isnan().all()  # no kernel output given


@pytest.mark.parametrize("frac", [0.1, 0.4])
def test_kernel_output_against_float64_reference(frac):
    """The real fast path's output, handed to layer_fidelity: its change against dense is the float64 one."""
    q, k, v = random_layer(13, 2, 2, LENGTH, 16, spread=1.0)  # the tiny Llama's shapes: no extra compile
    scale = 16 ** -0.5
    budgets = HeadBudgets.uniform(1, 2, frac, SPARSE)
    out = tca_prefill_attention(q, k, v, budgets.cdf(0), SPARSE, scale)
    keep = reference_selection(q, k, budgets.probs[0], SPARSE)[1]
    pos = query_positions(LENGTH, "all")
    lf = layer_fidelity(q, k, v, keep, SPARSE.window, scale, pos, out_bhsd=out)
    sparse_ref = reference_attention(q, k, v, reference_mask(keep, SPARSE.window, 4), scale)
    dense_ref = reference_attention(q, k, v, causal_mask(LENGTH, LENGTH).expand(1, 4, LENGTH, LENGTH), scale)
    want = (sparse_ref - dense_ref).abs().amax(-1)[0]
    torch.testing.assert_close(lf.kernel_diff.double(), want, atol=2e-5, rtol=1e-4)  # float32 kernel rounding
    assert want.max() > 1e-2  # TCA really changed the output


def test_unmeasured_report_keeps_gamma_and_writes_strict_json():
    q, k, v = random_layer(12, 2, 2, 60, 8)
    keep = torch.rand(1, 2, 60, generator=torch.Generator().manual_seed(1)) < 0.3
    pos = query_positions(60, 9)
    layers = [layer_fidelity(q, k, v, keep, 16, 8 ** -0.5, pos, measure=measure) for measure in (False, True)]
    torch.testing.assert_close(layers[0].gamma, layers[1].gamma)
    assert layers[0].diff.isnan().all() and layers[0].kernel_diff.isnan().all()
    rep = FidelityReport.from_layers(layers, positions=pos, seq_len=60, queries="9", quantile=0.9)
    data = json.loads(rep.to_json())  # allow_nan=False: NaN must have become null
    assert data["max_diff"][0] == [None, None] and data["max_diff"][1][0] is not None
    assert data["gamma_max"][0] == data["gamma_max"][1]
    assert "layer" in str(rep) and len(str(rep).splitlines()) == 3 + 4


def test_query_positions():
    assert query_positions(10, "last").tolist() == [9]
    assert query_positions(10, "all").tolist() == list(range(10))
    assert query_positions(10, 3).tolist() == [3, 6, 9]
    assert query_positions(4, 99).tolist() == [0, 1, 2, 3]
    for bad in (0, -2, "first", 2.5, True):
        with pytest.raises(ValueError, match="queries="):
            query_positions(10, bad)


# --- the runtime guard --------------------------------------------------------------------------


def last_query_retained(q, k, keep, window):
    """float64 ``[B, H_q]``: the last query's retained mass, from the float64 softmax."""
    p, _ = dense_probs(q[:, :, -1:], k, q.shape[-1] ** -0.5)
    length = k.shape[2]
    seen = keep.clone()
    seen[..., length - window:] = True  # the final window
    return (p[:, :, 0] * seen.repeat_interleave(q.shape[1] // k.shape[1], 1)).sum(-1)


guards = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "hkv": st.integers(1, 3),
    "group": st.sampled_from([1, 2, 4]),
    "block": st.sampled_from([8, 16]),
    "extra": st.integers(1, 120),
    "frac": st.floats(0.0, 0.5),
    "floor": st.floats(0.3, 1.0),
    "spread": st.floats(0.5, 4.0),
})


@given(guards)
@example({"seed": 0, "hkv": 2, "group": 4, "block": 8, "extra": 100, "frac": 0.0, "floor": 1.0,
          "spread": 1.0})
def test_guard_reaches_the_floor_for_every_query_head_minimally(p):
    window = p["block"]
    q, k, _ = random_layer(p["seed"], p["hkv"], p["group"], window + p["extra"], 8, p["spread"])
    config = TCAConfig(block_size=p["block"], window=window)
    length = q.shape[2]
    plain = run_select(q, k, config, p["frac"]).keep_mask(length)
    guarded = run_select(q, k, config, p["frac"], guard_floor=p["floor"]).keep_mask(length)
    before = last_query_retained(q, k, plain, window)
    after = last_query_retained(q, k, guarded, window)
    # The guarantee: every query head's last query retains >= floor (float32 rounding aside).
    assert (after >= p["floor"] - 1e-5).all()
    assert not (plain & ~guarded).any()  # only adds
    hq_per_kv = before.view(1, p["hkv"], p["group"]).amin(-1)
    untouched = hq_per_kv >= p["floor"] + 1e-5
    assert torch.equal(plain[untouched], guarded[untouched])
    # Top-p minimality: without the last token it added (lowest importance), some head falls short.
    added = guarded & ~plain
    s_ref = reference_importance(q, k, q.shape[-1] ** -0.5)  # the oracle's own importance, float64
    for h in range(p["hkv"]):
        if added[0, h].any():
            s = torch.where(added[0, h], s_ref[0, h], float("inf"))
            lowest = s.sort().values
            # Two added tokens within float32 noise of each other: either may have joined last.
            assume(added[0, h].sum() < 2 or lowest[1] - lowest[0] > 1e-5 * lowest[1])
            last = int(torch.nonzero(s == s.min()).max())
            fewer = guarded.clone()
            fewer[0, h, last] = False
            short = last_query_retained(q, k, fewer, window).view(1, p["hkv"], p["group"])[0, h]
            assert short.min() < p["floor"] + 1e-5


def test_guard_triggers_and_floor_zero_is_a_no_op():
    q, k, _ = random_layer(3, 2, 3, 200, 8, spread=1.0)
    config = TCAConfig(block_size=16, window=32)
    plain = run_select(q, k, config, 0.1).keep_mask(200)
    assert (last_query_retained(q, k, plain, 32) < 0.9).all()  # the guard has work to do
    guarded = run_select(q, k, config, 0.1, guard_floor=0.9).keep_mask(200)
    assert (last_query_retained(q, k, guarded, 32) >= 0.9 - 1e-5).all()
    assert guarded.sum() > plain.sum()
    assert torch.equal(run_select(q, k, config, 0.1, guard_floor=0.0).keep_mask(200), plain)


def test_guard_traces_without_graph_breaks():
    q, k, _ = random_layer(4, 2, 2, 90, 8)
    keep = torch.rand(1, 2, 58, generator=torch.Generator().manual_seed(0)) < 0.2
    s = torch.rand(1, 2, 58, generator=torch.Generator().manual_seed(1))

    def fn(q, k, keep, s):
        return guard_keep(keep, s, last_query_probs(q, k, 8 ** -0.5), 0.8)

    compiled = torch.compile(fn, fullgraph=True, backend="eager", dynamic=False)
    assert torch.equal(compiled(q, k, keep, s), fn(q, k, keep, s))


# --- the report on a tiny Llama -------------------------------------------------------------------


def ids(length, seed=0):
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def fresh_llama(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def capture_qkv(model, x):
    """Post-RoPE q/k/v per layer of a TCA forward, through a test-only attention function."""
    seen = {}

    def capture(module, query, key, value, *args, **kwargs):
        seen[module.layer_idx] = (query, key, value)
        return tca_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("tca_test_capture", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("tca_test_capture")
    try:
        with torch.no_grad():
            model(x, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return seen


@pytest.mark.parametrize("queries", ["all", 17])
def test_report_gamma_matches_float64_and_bound_holds_on_tiny_llama(queries, tmp_path):
    model = fresh_llama(21)
    budgets = HeadBudgets.uniform(2, 2, 0.1, SPARSE)
    tca_flex.apply(model, budgets=budgets)
    x = ids(LENGTH, seed=2)
    rep = tca_flex.report(model, x, queries=queries)
    assert model.config._attn_implementation == "tca"  # switched back

    pos = query_positions(LENGTH, queries)
    assert torch.equal(rep.positions, pos) and rep.sparse_layers.all()
    for layer, (q, k, v) in capture_qkv(model, x).items():
        scale = q.shape[-1] ** -0.5
        keep = reference_selection(q, k, budgets.probs[layer], SPARSE)[1]  # the oracle's own selection
        gamma_ref = reference_gamma(q, k, keep, 128, scale)[0][:, pos]
        torch.testing.assert_close(rep.gamma[layer].double(), gamma_ref, atol=2e-5, rtol=0)
        # The model's real kernel output against dense: the float64 reference's change.
        sparse_ref = reference_attention(q, k, v, reference_mask(keep, 128, q.shape[1]), scale)
        dense_ref = reference_attention(q, k, v, causal_mask(LENGTH, LENGTH).expand(1, 4, LENGTH, LENGTH), scale)
        diff_ref = (sparse_ref - dense_ref).abs().amax(-1)[0][:, pos]
        torch.testing.assert_close(rep.kernel_diff[layer].double(), diff_ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(rep.max_abs_v[layer], v[0].abs().amax((-2, -1)))
    # Theorem 1 against the measured change, per query and per head.
    assert (rep.diff <= rep.query_bound + 1e-6).all()
    assert (rep.kernel_diff <= rep.query_bound + 1e-5).all()  # float32 kernel rounding
    assert (rep.max_kernel_diff <= rep.bound + 1e-5).all()
    assert rep.gamma.max() > 0.05 and rep.diff.max() > 1e-3  # it really dropped mass

    # Views: table worst-first, JSON round trip, heat map.
    text = str(rep)
    worst_layer, worst_head = rep.worst()[0]
    assert rep.gamma_stat("max")[worst_layer, worst_head] == rep.gamma_stat("max").max()
    assert text.splitlines()[3].split()[:2] == [str(worst_layer), str(worst_head)]
    data = json.loads(rep.to_json(tmp_path / "r.json", per_query=True))
    assert data["gamma_max"] == rep.gamma_stat("max").tolist()
    assert json.loads((tmp_path / "r.json").read_text()) == data
    assert len(data["per_query"]["gamma"][0][0]) == pos.numel()
    pytest.importorskip("matplotlib")
    png = rep.plot(tmp_path / "gamma.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_window_covering_the_prompt_reports_zero():
    model = fresh_llama(22)
    tca_flex.apply(model, TCAConfig(block_size=32, window=256))
    rep = tca_flex.report(model, ids(200, seed=3), queries="all")
    assert not rep.sparse_layers.any()
    assert torch.equal(rep.gamma, torch.zeros_like(rep.gamma))
    assert torch.equal(rep.bound, torch.zeros_like(rep.bound))
    assert torch.equal(rep.diff, torch.zeros_like(rep.diff))
    assert torch.equal(rep.kept_fraction, torch.ones_like(rep.kept_fraction))
    assert rep.kernel_diff.max() < 1e-5  # SDPA vs float32 dense: rounding only
    assert rep.max_abs_v.min() > 0


def test_guard_floor_holds_for_every_head_of_the_model():
    floor = 0.9
    x = ids(LENGTH, seed=4)
    plain = fresh_llama(23)
    tca_flex.apply(plain, budgets=HeadBudgets.uniform(2, 2, 0.05, SPARSE))
    gamma_plain = tca_flex.report(plain, x).gamma[..., -1]
    assert (gamma_plain > 1 - floor).any()  # without the guard some head drops too much
    guarded = fresh_llama(23)
    config = SPARSE.replace(guard_floor=floor)
    tca_flex.apply(guarded, budgets=HeadBudgets.uniform(2, 2, 0.05, config))
    rep = tca_flex.report(guarded, x)
    assert rep.positions.tolist() == [LENGTH - 1]
    assert (rep.gamma[..., -1] <= 1 - floor + 1e-5).all()
    assert (rep.kernel_diff <= rep.query_bound + 1e-5).all()


def test_report_refuses_and_restores():
    model = fresh_llama(24)
    with pytest.raises(ValueError, match="not prepared by tca_flex.apply"):
        tca_flex.report(model, ids(20))
    tca_flex.apply(model, SPARSE)
    with pytest.raises(ValueError, match=r"\[1, L\]"):
        tca_flex.report(model, ids(20).repeat(2, 1))
    with pytest.raises(IndexError, match="index out of range"):
        tca_flex.report(model, torch.full((1, 20), 10_000))  # fails inside the forward (the embedding)
    assert model.config._attn_implementation == "tca"
