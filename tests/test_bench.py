"""The benchmark's --smoke mode runs the real code paths on tiny CPU shapes so it cannot rot."""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tca_flex import bench
from tca_flex.hfcompat import cache_kwargs
from tca_flex.integration import TCA_LENGTH_SOURCE


def test_smoke_benchmark_runs_and_checks_correctness():
    result = bench.main(["--smoke", "--e2e-layers", "1"])
    methods = {(r["phase"], r["method"]) for r in result["rows"]}
    assert {("prefill", "sdpa_default"), ("prefill", "flex_causal"), ("prefill", "tca_25%+w"),
            ("prefill", "tca_10%+w"), ("decode", "sdpa_compact@39%"), ("decode", "tca_auto@39%"),
            ("decode", "compress_math@39%"), ("decode", "tca_step@39%"), ("decode", "tca_step_math@39%"),
            ("decode", "tca_step_skip@39%"), ("decode", "tca_step_append_math@39%"), ("tpot", "dense_tpot"),
            ("ttft", "dense_sdpa")} <= methods
    for label in ("tca_25%+w", "tca_10%+w"):
        assert ("ttft", label) in methods
        assert {("tpot", f"{label} TCACache {variant}") for variant in bench.TPOT_VARIANTS} <= methods
    e2e = [r for r in result["rows"] if r["phase"] in ("ttft", "tpot")]
    assert all(r["layers"] == 1 for r in e2e)
    assert all(r["kv_bytes"] > 0 for r in e2e if r["phase"] == "tpot")
    if bench_decode_triton():  # the fused compression kernel, in Triton's interpreter on CPU
        fused = [r for r in result["rows"] if r["method"].startswith("compress_fused_leaving")]
        assert fused and all(r["heads_differing_from_math"] == 0 for r in fused)
        assert ("decode", "compress_fused_idle@39%") in methods
    tca = [r for r in result["rows"] if "computed_fraction" in r]
    # Checked against masked SDPA before timing; sparser budgets compute fewer blocks.
    assert all(r["rel_err"] < 1e-4 for r in tca)
    assert tca[1]["computed_fraction"] < tca[0]["computed_fraction"] < 1.0
    assert all(math.isfinite(r["ms"]) for r in result["rows"] if "ms" in r)


def test_e2e_times_the_compiled_model_for_dense_and_each_budget(tca_compile_settings, tmp_path):
    """``--compile-tpot``: dense decodes through ``torch.compile(model)``, every budget through
    ``tca_flex.compile(model)`` in each of ``--compiled-variants``; the keep fractions of
    ``--e2e-keep`` order the kept share. A smoke run given ``--out`` writes its JSON there."""
    result = bench.main(["--smoke", "--phases", "e2e", "--e2e-layers", "1", "--no-e2e-static", "--compile-tpot",
                         "aot_eager", "--tpot-variants", "fused-graph", "--compiled-variants", "fused-graph",
                         "two-graph+fused", "--e2e-keep", "0.4", "0.1", "--out", str(tmp_path)])
    (written,) = tmp_path.glob("*-e2e-1layers.json")
    assert json.loads(written.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert TCA_LENGTH_SOURCE in torch.compiler.config.dynamic_sources
    rows = {r["method"]: r for r in result["rows"] if r["phase"] == "tpot"}
    assert set(rows) == {"dense_tpot", "dense_tpot compiled"} | {
        f"tca_{p}%+w TCACache {v}" for p in (40, 10)
        for v in ("fused-graph", "fused-graph compiled", "two-graph+fused compiled")}
    assert [rows[f"tca_40%+w TCACache {v} compiled"]["two_graphs"] for v in ("fused-graph", "two-graph+fused")] == [
        False, True]
    assert not any("error" in r for r in rows.values())
    assert all(r["ms_synced"] is None for r in rows.values())  # CPU steps are all synchronous
    assert rows["dense_tpot compiled"]["backend"] == "aot_eager"
    kept = {p: rows[f"tca_{p}%+w TCACache fused-graph compiled"]["kept_fraction"] for p in (40, 10)}
    assert 1.0 > kept[40] > kept[10] > 0.0


def test_generate_phase_runs_plain_generate_for_dense_and_each_budget():
    """``--phases generate``: ``model.generate`` with transformers' default cache for dense and a
    ``TCACache`` per budget, every call making exactly its tokens; sparser budgets hold fewer bytes."""
    result = bench.main(["--smoke", "--phases", "generate", "--e2e-layers", "1", "--e2e-keep", "0.4", "0.1"])
    rows = {r["method"]: r for r in result["rows"] if r["phase"] == "generate"}
    assert set(rows) == {"dense", "tca_40%+w", "tca_10%+w"}
    assert [rows[m]["cache"] for m in ("dense", "tca_40%+w")] == ["DynamicCache", "TCACache"]
    assert {r["new_tokens"] for r in rows.values()} == {41}
    assert rows["tca_10%+w"]["kv_bytes"] < rows["tca_40%+w"]["kv_bytes"] < rows["dense"]["kv_bytes"]


def test_generate_phase_compiled_rows_compile_inside_generate():
    """``--generate-compile``: dense over the ``StaticCache`` generate makes and TCA over a ``TCACache``
    with reserved room, both compiled by ``generate`` itself (aot_eager on the CPU), beside the eager rows."""
    result = bench.main(["--smoke", "--phases", "generate", "--e2e-layers", "1", "--e2e-keep", "0.25",
                         "--generate-steps", "20", "--generate-compile"])
    rows = {r["method"]: r for r in result["rows"] if r["phase"] == "generate"}
    assert set(rows) == {"dense", "dense compiled", "tca_25%+w", "tca_25%+w compiled"}
    assert [(rows[m]["cache"], rows[m]["compiled"]) for m in ("dense compiled", "tca_25%+w compiled")] == [
        ("StaticCache", True), ("TCACache", True)]
    assert not rows["dense"]["compiled"] and not rows["tca_25%+w"]["compiled"]
    assert all(math.isfinite(r["first_call_ms"]) for r in rows.values())  # each row keeps its first request's time
    # Eager rows also time a call over key lengths not decoded before; compiled rows did that while compiling.
    assert [rows[m]["unseen_ms_per_token"] is None for m in rows] == [m.endswith("compiled") for m in rows]
    assert all(math.isfinite(rows[m]["unseen_ms_per_token"]) for m in ("dense", "tca_25%+w"))
    assert rows["tca_25%+w compiled"]["kv_bytes"] < rows["dense compiled"]["kv_bytes"]


def test_generate_phase_refuses_no_timed_tokens(capsys):
    """Zero timed tokens would divide by zero after minutes of prefill: refused up front."""
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--phases", "generate", "--generate-steps", "0"])
    assert "--generate-steps: must be >= 1" in capsys.readouterr().err


def bench_decode_triton():
    from tca_flex.decode import triton_supported

    return triton_supported(torch.empty(1, 1, 1, 32))


def test_one_step_dense_baseline_decodes_like_a_dynamic_cache(tiny_llama):
    """The e2e benchmark's fast dense decode step gives the logits of an ordinary DynamicCache step."""
    from transformers import DynamicCache

    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(5))
    step = dict(input_ids=torch.tensor([[7]]), position_ids=torch.tensor([[300]]), cache_position=torch.tensor([300]),
                use_cache=True)
    with torch.no_grad():
        caches = [DynamicCache(config=tiny_llama.config) for _ in range(2)]
        for cache in caches:
            tiny_llama(ids, **cache_kwargs(tiny_llama, cache), use_cache=True)
        want = tiny_llama(**cache_kwargs(tiny_llama, caches[0]), **step).logits
        fast = bench.one_step_dense(caches[1])
        got = tiny_llama(**cache_kwargs(tiny_llama, fast), **step).logits
        static = tiny_llama(**cache_kwargs(tiny_llama, bench.static_copy(tiny_llama, fast, 300, torch.device("cpu"))),
                            **step).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(static, want, atol=1e-5, rtol=1e-5)


def test_smoke_stream_phase_compiles_nothing_after_the_warmup():
    """Two fresh processes over distinct lengths: no request compiles after ``tca_flex.warmup``."""
    result = bench.main(["--smoke", "--phases", "stream", "--stream-count", "3"])
    stream = result["stream"]
    assert len(set(stream["lengths"])) == 3
    for run in stream["runs"]:
        assert run["stream_graphs"] == 0, run["process"]
        scopes = {(r["scope"], r["method"]) for r in run["rows"]}
        assert scopes == {(s, m) for s in ("attention", "e2e") for m in ("dense_sdpa", "tca")}
        assert all(math.isfinite(r["ms"]) for r in run["rows"])
        assert set(run["summary"]) == {"attention", "e2e"}


def test_smoke_chunks_phase_times_chunked_prefill_and_conversations():
    result = bench.main(["--smoke", "--phases", "chunks", "--e2e-layers", "1"])
    rows = {r["method"]: r for r in result["rows"]}
    assert {"dense_chunked", "tca_chunked", "tca_one_shot"} <= set(rows)
    assert all(math.isfinite(r["ms"]) for r in result["rows"])
    assert 0 < rows["tca_chunked"]["kept_fraction"] < 1 and 0 < rows["tca_one_shot"]["kept_fraction"] < 1
    # Appending feeds the new turn and the last reply token; re-prefilling feeds the whole conversation.
    assert rows["turn2 tca_append"]["turn_tokens"] == rows["turn2 dense_append"]["turn_tokens"] == 64 + 1
    assert rows["turn2 tca_reprefill"]["turn_tokens"] == 300 + 8 + 64
    assert rows["turn2 tca_append"]["length"] == rows["turn2 tca_reprefill"]["length"] == 300 + 8 + 64 + 8
    # The first turn by reconstruction feeds the same tokens, then appends like tca_append.
    assert rows["turn1 tca_recon_append"]["turn_tokens"] == rows["turn1 tca_append"]["turn_tokens"] == 300
    assert rows["turn2 tca_recon_append"]["turn_tokens"] == 64 + 1


def test_smoke_batch_phase_times_padded_batches_against_rows_and_dense():
    result = bench.main(["--smoke", "--phases", "batch", "--e2e-layers", "1", "--batch-sizes", "2", "3",
                         "--batch-decode-steps", "6"])
    rows = {(r["batch"], r["method"]): r for r in result["rows"]}
    for size in (2, 3):
        for method in ("tca_padded", "tca_rows_sum", "dense_sdpa_padded", "dense_sdpa_rows_sum"):
            r = rows[(size, method)]
            assert "error" not in r and math.isfinite(r["ms"]), (size, method, r.get("error"))
            assert len(r["lengths"]) == size and all(300 <= n <= 700 for n in r["lengths"])
        tca, dense = rows[(size, "tca_padded")], rows[(size, "dense_sdpa_padded")]
        assert math.isfinite(tca["decode_tokens_per_s"]) and math.isfinite(dense["decode_tokens_per_s"])
        assert math.isfinite(tca["decode_tokens_per_s_graph"]) and math.isfinite(dense["decode_tokens_per_s_graph"])
        assert math.isfinite(dense["decode_tokens_per_s_graph_maskless"])
        assert 0 < tca["kv_bytes"] < dense["kv_bytes"] and 0 < tca["kept_fraction"] < 1


def test_smoke_generate_stream_phase_compiles_nothing_after_the_warmup():
    """``--phases generate_stream``: every method sees every distinct length once, in the same order,
    and after ``tca_flex.warmup(generate=True)`` no TCA request compiles anything, eager or through
    generate's own compiled decode step over ``TCACache(reserve_tokens=...)``."""
    result = bench.main(["--smoke", "--phases", "generate_stream", "--stream-count", "5", "--e2e-layers", "1",
                         "--generate-steps", "36"])
    lengths = result["generate_stream"]["lengths"]
    assert len(set(lengths)) == 5
    rows = [r for r in result["rows"] if r["phase"] == "generate_stream"]
    for method in ("dense", "dense compiled", "tca", "tca compiled"):
        mine = [r for r in rows if r["method"] == method]
        assert [r["length"] for r in mine] == lengths, method
        assert all(math.isfinite(r["ms"]) and r["new_tokens"] == 36 for r in mine)
    graphs = {m: [r["graphs"] for r in rows if r["method"] == m] for m in ("tca", "tca compiled")}
    assert graphs == {"tca": [0] * 5, "tca compiled": [0] * 5}
    assert math.isfinite(result["generate_stream"]["warmup_generate_s"])
    assert {r["cache"] for r in rows if r["method"].startswith("tca")} == {"TCACache"}
    assert not any(r["regrew"] for r in rows if r["method"] == "tca compiled")  # the reserve covers the answer


@given(ratio=st.floats(0.01, 100.0))
def test_speeds_are_said_as_faster_or_slower(ratio):
    from tca_flex.bench_stream import speed_words

    words = speed_words(ratio)
    number = float(words.split("x ")[0])
    if ratio >= 1:
        assert words.endswith("x faster") and number == pytest.approx(ratio, abs=0.006)
    else:
        assert words.endswith("x slower") and number == pytest.approx(1 / ratio, abs=0.006)


def test_stream_lengths_are_distinct_or_refused():
    from tca_flex.bench_stream import stream_lengths

    lengths = stream_lengths(5, 100, 104, seed=int(torch.randint(0, 10**6, ())))
    assert sorted(lengths) == list(range(100, 105))
    with pytest.raises(ValueError, match="6 distinct lengths do not fit"):
        stream_lengths(6, 100, 104, seed=0)
