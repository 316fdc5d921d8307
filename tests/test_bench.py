"""The benchmark's --smoke mode runs the real code paths on tiny CPU shapes so it cannot rot."""

from tca_flex import bench


def test_smoke_benchmark_runs_and_checks_correctness():
    result = bench.main(["--smoke", "--e2e-layers", "1"])
    methods = {(r["phase"], r["method"]) for r in result["rows"]}
    assert {("prefill", "sdpa_default"), ("prefill", "flex_causal"), ("prefill", "tca_25%+w"),
            ("prefill", "tca_10%+w"), ("decode", "sdpa_compact_0.39"), ("ttft", "dense_sdpa")} <= methods
    tca = [r for r in result["rows"] if "computed_fraction" in r]
    # Checked against masked SDPA before timing; sparser budgets compute fewer blocks.
    assert all(r["rel_err"] < 1e-4 for r in tca)
    assert tca[1]["computed_fraction"] < tca[0]["computed_fraction"] < 1.0
    assert all(r["ms"] > 0 for r in result["rows"] if "ms" in r)
