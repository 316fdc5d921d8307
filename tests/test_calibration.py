import json
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AttentionInterface, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import tca_flex
from tca_flex import HeadBudgets, TCAConfig, calibrate
from tca_flex.budgets import BUDGETS_FORMAT_VERSION, shipped_budgets
from tca_flex.calibration import (
    DENSE,
    budgets_from_scores,
    candidate_distributions,
    choose_candidates,
    min_calibration_tokens,
    score_candidates,
)
from tca_flex.calibration.scoring import score_layer
from tca_flex.config import SelectionConfig
from tca_flex.reference import reference_mask
from tca_flex.selection import select

from .cli_checks import refused_before_loading
from .conftest import tiny_llama_config

CONFIG = TCAConfig(block_size=16, window=64, tau=0.8)
CRITERIA = ["column_mean", "lse"]
# name -> config changes of every retained-mass measure under test
MEASURES = {"column_mean": {"mass_criterion": "column_mean"}, "lse": {"mass_criterion": "lse"},
            "lse_q20": {"mass_criterion": "lse", "mass_quantile": 0.2}}


def text_ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def tiny_model(seed: int, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


@pytest.fixture(scope="module")
def calibrated():
    """(model, ids, {criterion: CandidateScores}) on a fresh tiny model and text."""
    seed = 101
    model, ids = tiny_model(seed), text_ids(240, seed)
    scores = {name: score_candidates(model, ids, CONFIG.replace(**changes), progress=False)
              for name, changes in MEASURES.items()}
    return model, ids, scores


@given(b=st.integers(1, 256), m=st.integers(1, 20), sigma=st.floats(0.05, 3.0))
@example(b=8, m=2, sigma=2.0)
def test_candidate_distributions_are_nested_and_normalised(b, m, sigma):
    p = candidate_distributions(b, m, sigma)
    assert p.shape == (m, b + 1) and p.dtype == torch.float64
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(m, dtype=torch.float64))
    cdf = p.cumsum(-1)
    # A larger centre dominates: every quantile (budget ladder entry) grows with m.
    assert (cdf[1:] <= cdf[:-1] + 1e-12).all()
    mean = (p * torch.arange(b + 1)).sum(-1)
    assert (mean[1:] >= mean[:-1] - 1e-9).all()
    if m > 1 and b >= 8:
        assert mean[0] < mean[-1]
        if sigma <= 1.0:  # a wide spread smears even the sparsest centre past b/4
            assert mean[0] < 0.25 * b < mean[-1]


def synthetic_heads(seed: int, length: int = 640, d: int = 16):
    """KV head 0 sharply peaked (one spike key per block), KV head 1 nearly uniform."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    k = torch.randn(1, 2, length, d, generator=g) * 0.1
    spikes = torch.arange(0, length, 16) + torch.randint(0, 16, (length // 16,), generator=g)
    k[0, 0, spikes] = 8 * u
    q = torch.randn(1, 4, length, d, generator=g) * 1e-3
    q[0, :2] += 8 * u  # query heads 0, 1 use KV head 0
    return q, k


@pytest.mark.parametrize("criterion", CRITERIA)
@settings(max_examples=4)
@given(seed=st.integers(0, 2**31 - 1))
def test_peaked_heads_get_small_budgets_uniform_heads_large(criterion, seed):
    q, k = synthetic_heads(seed)
    config = TCAConfig(block_size=16, window=128, tau=0.9, mass_criterion=criterion)
    cdfs = candidate_distributions(16, config.num_candidates, config.sigma).cumsum(-1)
    retained, kept = score_layer(q, k, cdfs, config, 0.25)
    assert (retained[:, 1:] >= retained[:, :-1] - 1e-9).all()  # nested candidates
    choice = choose_candidates(retained, kept, config.tau)
    kept_chosen = torch.where(choice == DENSE, 1.0, kept.gather(-1, choice.clamp(min=0)[:, None])[:, 0])
    assert kept_chosen[0] < 0.2, (choice, retained)
    assert kept_chosen[1] > 0.75, (choice, retained)


class _Capture:
    """Independent q/k capture for the reference check (not calibration's own hook)."""

    name = "test_capture_qk"

    def __init__(self):
        self.qk = {}
        AttentionInterface.register(self.name, self)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.qk[module.layer_idx] = (query.detach().clone(), key.detach().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def reference_retained(q, k, probs_hk, config, scaling):
    """float64 ``[H_kv]`` retained mass from the explicit L x L reference mask."""
    hq, length = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    # The keep set is the online selection's (checked against reference_keep in
    # test_selection): random tiny models attend almost uniformly, so block
    # scores tie to ~1e-7 and float32 / float64 rankings may legitimately
    # differ (seed 2139784369). What is checked here is the mass, in float64.
    knobs = SelectionConfig(block_size=config.block_size, window=config.window, alpha=config.alpha)
    keep = select(q, k, probs_hk.cumsum(-1), knobs, scaling=scaling).keep_mask(length)
    mask = reference_mask(keep, config.window, hq)[0]  # [H_q, L, L]
    logits = (q[0].double() @ k[0].double().repeat_interleave(hq // hkv, 0).transpose(-1, -2)) * scaling
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    attn = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    if config.mass_criterion == "lse":
        per_query = (attn * mask)[:, config.window:].sum(-1)
        per_head = per_query.mean(-1) if config.mass_quantile is None else torch.quantile(
            per_query, config.mass_quantile, dim=-1)
    else:
        seen = torch.arange(length, 0, -1, dtype=torch.float64)
        col = attn.sum(1) / seen
        lost = (attn * (causal & ~mask)).sum(1) / seen
        per_head = 1 - lost.sum(-1) / col.sum(-1)
    return per_head.view(hkv, -1).mean(-1)


def check_against_reference(model, ids, budgets: HeadBudgets) -> None:
    capture = _Capture()
    model.set_attn_implementation(capture.name)
    with torch.no_grad():
        model(ids)
    model.set_attn_implementation("sdpa")
    assert (budgets.candidate != DENSE).any(), "the test needs sparse heads"
    for layer, (q, k) in capture.qk.items():
        ref = reference_retained(q, k, budgets.probs[layer], budgets.config, q.shape[-1] ** -0.5)
        sparse = budgets.candidate[layer] != DENSE
        assert (ref[sparse] >= budgets.config.tau - 1e-6).all()
        torch.testing.assert_close(ref[sparse], budgets.retained_mass[layer][sparse], atol=2e-5, rtol=0)


@pytest.mark.parametrize("criterion", list(MEASURES))
def test_non_dense_heads_retain_tau_by_the_float64_reference(calibrated, criterion):
    model, ids, scores = calibrated
    check_against_reference(model, ids, budgets_from_scores(scores[criterion]))


def test_reference_check_on_a_seed_with_near_tied_blocks():
    model, ids = tiny_model(2139784369), text_ids(240, 2139784369)
    check_against_reference(model, ids, calibrate(model, ids, CONFIG.replace(mass_criterion="lse"),
                                                  progress=False))


@pytest.mark.parametrize("criterion", list(MEASURES))
@given(taus=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2).map(sorted))
def test_raising_tau_never_shrinks_a_budget(calibrated, criterion, taus):
    scores = calibrated[2][criterion]
    low, high = (budgets_from_scores(scores, t) for t in taus)
    assert (high.keep_fraction() >= low.keep_fraction() - 1e-12).all()
    cand = lambda b: torch.where(b.candidate == DENSE, 10**6, b.candidate)  # noqa: E731
    assert (cand(high) >= cand(low)).all()


@given(seed=st.integers(0, 2**31 - 1), taus=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2).map(sorted))
def test_choice_is_monotone_in_tau_on_arbitrary_tables(seed, taus):
    g = torch.Generator().manual_seed(seed)
    retained = torch.rand(3, 4, 7, generator=g, dtype=torch.float64)
    kept = torch.rand(3, 4, 7, generator=g, dtype=torch.float64)
    low, high = (choose_candidates(retained, kept, t) for t in taus)
    cost = lambda c: torch.where(c == DENSE, 2.0, kept.gather(-1, c.clamp(min=0)[..., None])[..., 0])  # noqa: E731
    assert (cost(high) >= cost(low)).all()
    passes = retained.gather(-1, high.clamp(min=0)[..., None])[..., 0] >= taus[1]
    assert (passes | (high == DENSE)).all()
    assert ((high == DENSE) == (retained < taus[1]).all(-1)).all()


def assert_same_budgets(a: HeadBudgets, b: HeadBudgets) -> None:
    assert torch.equal(a.probs, b.probs)
    assert a.config == b.config and a.fingerprint == b.fingerprint and a.notes == b.notes
    for x, y in ((a.retained_mass, b.retained_mass), (a.candidate, b.candidate)):
        assert (x is None and y is None) or torch.equal(x.nan_to_num(-7.0), y.nan_to_num(-7.0))


def test_budget_files_round_trip_exactly(calibrated, tmp_path):
    budgets = budgets_from_scores(calibrated[2]["lse"])
    path = tmp_path / "b.json"
    budgets.save(path)
    assert json.loads(path.read_text())["format_version"] == BUDGETS_FORMAT_VERSION
    assert_same_budgets(HeadBudgets.load(path), budgets)
    # Hand-made budgets (no mass, no candidate) and unknown masses survive too.
    g = torch.Generator().manual_seed(102)
    probs = torch.rand(3, 2, 9, generator=g, dtype=torch.float64)
    mass = torch.rand(3, 2, generator=g, dtype=torch.float64)
    mass[1, 0] = math.nan
    for b in (HeadBudgets(probs / probs.sum(-1, keepdim=True), TCAConfig(block_size=8, window=32)),
              HeadBudgets(probs / probs.sum(-1, keepdim=True), TCAConfig(block_size=8, window=32),
                          retained_mass=mass, candidate=torch.randint(-1, 5, (3, 2), generator=g))):
        b.save(path)
        assert_same_budgets(HeadBudgets.load(path), b)


def test_apply_takes_a_path_and_refuses_another_model(calibrated, tmp_path):
    model, ids, scores = calibrated
    path = tmp_path / "b.json"
    budgets_from_scores(scores["lse"]).save(path)
    other = tiny_model(103, hidden_size=128)  # same layers and KV heads, head_dim 32
    with pytest.raises(ValueError, match=r"2 layers x 2 KV heads x head_dim 16.*head_dim 32"):
        tca_flex.apply(other, budgets=path)
    deeper = tiny_model(104, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"llama: 2 layers .* llama: 3 layers"):
        tca_flex.apply(deeper, budgets=str(path))
    tca_flex.apply(model, budgets=path)
    try:
        assert_same_budgets(tca_flex.integration.applied_budgets(model), HeadBudgets.load(path))
    finally:
        tca_flex.remove(model)


@pytest.mark.parametrize("version", [0, BUDGETS_FORMAT_VERSION + 1, "1", None])
def test_unknown_or_old_versions_are_refused(calibrated, tmp_path, version):
    data = json.loads(budgets_from_scores(calibrated[2]["lse"]).to_json())
    data["format_version"] = version
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"format_version={version!r}.*re-run calibration"):
        HeadBudgets.load(path)
    path.write_text(json.dumps({"probs": [[[1.0]]]}))
    with pytest.raises(ValueError, match="not a tca_flex budget file"):
        HeadBudgets.load(path)
    del data["heads"]
    data["format_version"] = BUDGETS_FORMAT_VERSION
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"b.json: field \(top level\): missing \['heads'\]"):
        HeadBudgets.load(path)


def test_calibration_is_deterministic_and_restores_attention(calibrated):
    model, ids, scores = calibrated
    again = calibrate(model, ids, CONFIG.replace(mass_criterion="column_mean"), progress=False)
    assert_same_budgets(again, budgets_from_scores(scores["column_mean"]))
    assert model.config._attn_implementation == "sdpa"


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (numel)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_calibration_memory_grows_linearly_with_length():
    model = tiny_model(105)
    largest = []
    for length in (256, 1024):
        with _LargestTensor() as mode:
            score_candidates(model, text_ids(length, 106), CONFIG, progress=False, chunk=16)
        largest.append(mode.largest)
    # 4x the tokens: linear memory gives 4x, an L x L tensor 16x.
    assert largest[1] <= 5 * largest[0], largest


def test_bad_inputs_are_refused(calibrated):
    model = calibrated[0]
    need = min_calibration_tokens(CONFIG)
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, torch.zeros(1, 0, dtype=torch.long), CONFIG, progress=False)
    with pytest.raises(ValueError, match=f"at least {need}"):
        calibrate(model, text_ids(need - 1, 107), CONFIG, progress=False)
    with pytest.raises(ValueError, match="one sequence"):
        calibrate(model, text_ids(need, 108).repeat(2, 1), CONFIG, progress=False)
    for chunk in (0, -1, 2.0):
        with pytest.raises(ValueError, match="chunk"):
            calibrate(model, text_ids(need, 108), CONFIG, progress=False, chunk=chunk)
    unsupported = tiny_model(109)
    unsupported.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="does not support model_type"):
        calibrate(unsupported, text_ids(need, 110), CONFIG, progress=False)
    broken = tiny_model(111)
    with torch.no_grad():
        broken.model.layers[1].self_attn.k_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite query/key activations in layer 1"):
        calibrate(broken, text_ids(need, 112), CONFIG, progress=False)
    assert broken.config._attn_implementation == "sdpa"


def test_shipped_smollm2_budgets():
    budgets = shipped_budgets("smollm2")
    assert budgets.probs.shape == (30, 3, 65)
    assert (budgets.num_layers, budgets.num_kv_heads, budgets.fingerprint["head_dim"]) == (30, 3, 64)
    assert (budgets.config.block_size, budgets.config.window, budgets.config.tau) == (64, 512, 0.9)
    assert budgets.config == TCAConfig.accurate(block_size=64, window=512, mass_criterion="lse",
                                                mass_quantile=0.1)
    # <= 50% of an 8K prompt's KV (global subset + window), EVALUATION.md's target
    assert (budgets.keep_fraction().mean() * (8192 - 512) + 512) / 8192 <= 0.5
    sparse = budgets.candidate != DENSE
    assert (budgets.retained_mass[sparse] >= 0.9).all()
    assert budgets.keep_fraction().std() > 0.01  # heads differ
    with pytest.raises(ValueError, match="available"):
        shipped_budgets("gpt2")


def test_cli_calibrates_a_local_model_directory(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tca_flex.calibration.__main__ import main

    vocab = {f"w{i}": i for i in range(255)} | {"[UNK]": 255}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "model")
    tiny_model(113).save_pretrained(tmp_path / "model")
    words = torch.randint(0, 255, (300,), generator=torch.Generator().manual_seed(114))
    (tmp_path / "text.txt").write_text(" ".join(f"w{i}" for i in words.tolist()))
    out = tmp_path / "budgets.json"
    main(["--model", str(tmp_path / "model"), "--text", str(tmp_path / "text.txt"), "--tokens", "200",
          "--out", str(out), "--block-size", "16", "--window", "64", "--tau", "0.8", "--criterion", "lse",
          "--option", "spread_observation_queries=8", "--option", "alpha=0", "--anchor"])
    budgets = HeadBudgets.load(out)
    assert budgets.config.anchor_blocks == 9  # ceil((200 - 64) / 16): the calibration length's blocks
    assert budgets.notes["num_tokens"] == 200 and budgets.notes["command"].endswith("--option alpha=0 --anchor")
    assert (budgets.config.spread_observation_queries, budgets.config.alpha) == (8, 0.0)
    assert (budgets.config.block_size, budgets.config.window, budgets.config.tau) == (16, 64, 0.8)
    assert budgets.fingerprint["num_layers"] == 2 and budgets.config.mass_criterion == "lse"
    table = capsys.readouterr().out
    assert table.count("\n    0 ") == 1 and "\n  all " in table and "wrote" in table


@pytest.mark.parametrize("args, error", [
    (["--tokens", "-5"], "argument --tokens: must be >= 1, got -5"),
    (["--tokens", "100"], "argument --tokens: 100 is too few; calibration needs at least 128"),
    (["--option", "normalize_redundancy=ture"], "--option 'normalize_redundancy=ture': normalize_redundancy "
                                                "takes true or false, got 'ture'"),
    (["--option", "alpha=abc"], "--option 'alpha=abc': alpha takes a number, got 'abc'"),
    (["--option", "alpha=2"], "argument --option: TCAConfig.alpha=2.0 is out of range"),
    (["--option", "tau=0.5"], "--option 'tau=0.5': tau has its own flag, use --tau"),
    (["--tau", "1.5"], "argument --tau: must be in [0.0, 1.0], got 1.5"),
    (["--sigma", "nan"], "argument --sigma: must be >= 0.0, got nan"),
    (["--quantile", "0.1"], "argument --quantile: applies to --criterion lse only"),
    (["--anchor", "--option", "anchor_blocks=4"], "argument --anchor: sets anchor_blocks from the calibration"),
    (["--window", "8"], "argument --window: TCAConfig.window=8 is out of range"),
    (["--out", "{tmp}"], "argument --out: {tmp} is a directory"),
    (["--out", "{tmp}/no/b.json"], "argument --out: the folder {tmp}/no does not exist"),
    (["--text", "{tmp}/missing.txt"], "argument --text: cannot read {tmp}/missing.txt"),
    (["--model", "gpt2"], "argument --model: 'gpt2' is neither 'smollm2' nor a local model directory"),
])
def test_cli_mistakes_end_in_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, args, error):
    from tca_flex.calibration import __main__ as cli

    def loaded(model):
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load", loaded)
    (tmp_path / "text.txt").write_text("w1 w2 w3")
    base = ["--model", str(tmp_path), "--text", str(tmp_path / "text.txt"), "--out", str(tmp_path / "b.json"),
            "--block-size", "16", "--window", "64"]
    line = refused_before_loading(cli.main, base, [a.format(tmp=tmp_path) for a in args], "tca_flex.calibration",
                                  capsys)
    assert error.format(tmp=tmp_path) in line
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow
def test_shipped_budgets_fit_the_bundled_model(smollm2):
    model, _ = smollm2
    tca_flex.apply(model, budgets=shipped_budgets("smollm2"))
    try:
        fingerprint = tca_flex.integration.model_fingerprint(model)
        assert tca_flex.integration.applied_budgets(model).fingerprint["head_dim"] == fingerprint["head_dim"]
    finally:
        tca_flex.remove(model)
    with pytest.raises(ValueError, match="30 layers x 3 KV heads x head_dim 64.*head_dim 16"):
        tca_flex.apply(tiny_model(115, num_hidden_layers=30, num_key_value_heads=3,
                                  num_attention_heads=6, hidden_size=96), budgets=shipped_budgets("smollm2"))


@settings(max_examples=5)
@given(seed=st.integers(0, 2**31 - 1), extra=st.integers(1, 90), chunk=st.integers(7, 64),
       quantile=st.sampled_from([None, 0.1, 0.5]))
def test_batched_lse_mass_equals_mass_retained_mass(seed, extra, chunk, quantile):
    from tca_flex.calibration.scoring import candidate_keep_masks, lse_mass
    from tca_flex.mass import retained_mass

    g = torch.Generator().manual_seed(seed)
    length, window = 96 + extra, 64
    q, k = torch.randn(1, 6, length, 8, generator=g) * 2, torch.randn(1, 2, length, 8, generator=g) * 2
    config = TCAConfig(block_size=16, window=window)
    keep = candidate_keep_masks(q, k, candidate_distributions(16, 5, 0.5).cumsum(-1), config, 0.3)
    batched = lse_mass(q, k, keep, window, 0.3, chunk=chunk, quantile=quantile)  # [H_q, M]
    for m in range(keep.shape[0]):
        per_query = retained_mass(q, k, keep[m][None], window, 0.3, queries=torch.arange(window, length))[0]
        expected = per_query.double().mean(-1) if quantile is None else torch.quantile(
            per_query.double(), quantile, dim=-1)
        # Both sides are float32 sums of up to ~200 probabilities taken in different orders
        # (chunked vs per query): they differ by a few float32 ulps of 1 (1.02e-6 was seen);
        # a wrong keep mask or window moves the mass by far more than 1e-5.
        torch.testing.assert_close(batched[:, m], expected, atol=1e-5, rtol=0)


def test_anchored_budgets_select_as_calibrated_at_the_calibration_length():
    from tca_flex.selection import select

    seed = 116
    g = torch.Generator().manual_seed(seed)
    config = TCAConfig(block_size=16, window=32, alpha=0.0)
    probs = torch.rand(1, 2, 17, generator=g, dtype=torch.float64) ** 4
    budgets = HeadBudgets(probs=probs / probs.sum(-1, keepdim=True), config=config, notes={"num_tokens": 32 + 16 * 12})
    anchored = budgets.anchored()
    assert anchored.config.anchor_blocks == 12 and budgets.config.anchor_blocks == 0

    def kept(b, length):
        q = torch.randn(1, 4, length, 8, generator=torch.Generator().manual_seed(seed))
        k = torch.randn(1, 2, length, 8, generator=torch.Generator().manual_seed(seed + 1))
        knobs = SelectionConfig(block_size=16, window=32, alpha=0.0, anchor_blocks=b.config.anchor_blocks)
        return select(q, k, b.cdf(0), knobs, scaling=8**-0.5).keep_mask(length)

    assert torch.equal(kept(anchored, 32 + 16 * 12), kept(budgets, 32 + 16 * 12))
    short_plain, short_anchored = kept(budgets, 32 + 16 * 4), kept(anchored, 32 + 16 * 4)
    assert (short_anchored.sum(-1) <= short_plain.sum(-1)).all()
    with pytest.raises(ValueError, match="calibration length"):
        HeadBudgets(probs=budgets.probs, config=config).anchored()
