import pytest

from tca_flex import HeadBudgets, TCAConfig
from tca_flex.config import ACCURATE_GRACE_TOKENS


def test_defaults_are_the_papers():
    c = TCAConfig()
    assert (c.block_size, c.window, c.tau, c.alpha, c.num_candidates) == (128, 4096, 0.9, 0.5, 14)


def test_accurate_preset_changes_only_selection_and_decode_knobs_and_round_trips():
    c = TCAConfig.accurate(block_size=64, window=512, pool_kernel=5)
    paper = TCAConfig(block_size=64, window=512)
    changed = {k for k, v in c.to_dict().items() if paper.to_dict()[k] != v}
    assert changed == {"sigma", "alpha", "num_observation_queries", "pool_kernel", "spread_observation_queries",
                       "grace_blocks", "cache_spread_observation_queries"}
    assert c.compress_window == 512 + 64 * c.grace_blocks > paper.compress_window == 512
    # The grace is ACCURATE_GRACE_TOKENS in whole blocks, whatever the block size.
    for block in (16, 64, 100, 128, 256):
        grace = TCAConfig.accurate(block_size=block, window=1024).grace_blocks
        assert (grace - 1) * block < ACCURATE_GRACE_TOKENS <= grace * block
    assert c.pool_kernel == 5 and c.tau == paper.tau and TCAConfig.from_dict(c.to_dict()) == c


def test_round_trip_through_dict():
    c = TCAConfig(block_size=64, window=512, tau=0.8, gqa_aggregation="max", normalize_redundancy=True,
                  mass_criterion="lse", mass_quantile=0.1)
    assert TCAConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("kwargs, field", [
    (dict(block_size=0), "block_size"),
    (dict(window=64, block_size=128), "window"),
    (dict(tau=1.5), "tau"),
    (dict(alpha=-0.1), "alpha"),
    (dict(gqa_aggregation="median"), "gqa_aggregation"),
    (dict(num_observation_queries=0), "num_observation_queries"),
    (dict(spread_observation_queries=-1), "spread_observation_queries"),
    (dict(cache_spread_observation_queries=-1), "cache_spread_observation_queries"),
    (dict(cache_spread_observation_queries=0.5), "cache_spread_observation_queries"),
    (dict(mass_criterion="kl"), "mass_criterion"),
    (dict(mass_quantile=0.1), "applies to mass_criterion='lse' only"),
    (dict(block_size=64.0), "block_size"),
    (dict(version=99), "version"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TCAConfig(**kwargs)


def test_unknown_dict_field_is_refused():
    with pytest.raises(ValueError, match="unknown TCAConfig fields"):
        TCAConfig.from_dict({"block_size": 64, "windw": 512})


def test_uniform_budgets_have_the_asked_expectation():
    b = HeadBudgets.uniform(3, 2, 0.37, TCAConfig(block_size=64, window=128))
    assert b.expected_per_block().sub(0.37 * 64).abs().max() < 1e-9
    with pytest.raises(ValueError, match="keep_fraction"):
        HeadBudgets.uniform(3, 2, 1.2)
