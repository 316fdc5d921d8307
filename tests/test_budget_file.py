"""Budget files: exact round trips, and every damaged file refused with its name and field."""

import copy
import json
import math
import re

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tca_flex import HeadBudgets, TCAConfig

FINGERPRINT = {"model_type": "llama", "architecture": "LlamaForCausalLM", "num_layers": 2, "num_kv_heads": 2,
               "head_dim": 16, "name_or_path": None}


def assert_same_budgets(a: HeadBudgets, b: HeadBudgets) -> None:
    assert torch.equal(a.probs, b.probs)
    assert a.config == b.config and a.fingerprint == b.fingerprint and a.notes == b.notes
    for x, y in ((a.retained_mass, b.retained_mass), (a.candidate, b.candidate)):
        assert (x is None and y is None) or torch.equal(x.nan_to_num(-7.0), y.nan_to_num(-7.0))


@st.composite
def budgets(draw) -> HeadBudgets:
    """Valid budgets of a few heads: random probabilities, some dense rows, optional records."""
    layers, heads, b = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    probs = torch.rand(layers, heads, b + 1, generator=g, dtype=torch.float64) ** 3
    probs[torch.rand(layers, heads, generator=g) < 0.3] = torch.nn.functional.one_hot(
        torch.tensor(b), b + 1).double()
    mass = torch.rand(layers, heads, generator=g, dtype=torch.float64)
    unknown = torch.rand(layers, heads, generator=g) < 0.3
    unknown[0, 0] = False  # all unknown is written as no retained mass at all
    mass[unknown] = math.nan
    # anchor_blocks and grace_blocks stay 0: files older than those fields lack them and load as 0
    # (budget_file.py).
    quantile = draw(st.none() | st.floats(0.0, 1.0))  # a quantile needs the per-query criterion
    config = TCAConfig(block_size=b, window=4 * b, tau=draw(st.floats(0.0, 1.0)), mass_quantile=quantile,
                       mass_criterion="lse" if quantile is not None else draw(st.sampled_from(["column_mean", "lse"])),
                       guard_floor=draw(st.none() | st.floats(0.0, 1.0)), normalize_redundancy=draw(st.booleans()))
    return HeadBudgets(probs=probs / probs.sum(-1, keepdim=True), config=config,
                       retained_mass=draw(st.sampled_from([None, mass])),
                       candidate=draw(st.sampled_from([None, torch.randint(-1, 14, (layers, heads), generator=g)])),
                       fingerprint=draw(st.sampled_from([{}, FINGERPRINT])),
                       notes={"command": "python -m tca_flex.calibration ...", "num_tokens": 240})


def paths(node, path=()):
    """Every value's path; notes are free-form provenance, so nothing inside them is a damage."""
    yield path
    if path == ("notes",):
        return
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from paths(child, (*path, key))


def at(data, path):
    for key in path:
        data = data[key]
    return data


# Values of another JSON kind than the original's (null is left out where a kind
# allows it: a number set to null is a legal "unknown", not a damage).
OTHER_KIND = {str: [1, True, [], {}], int: ["x", True, [], {}], float: ["x", True, [], {}], bool: ["x", 1, [], {}],
              list: ["x", 1, {}], dict: ["x", 1, []], type(None): [True, [], {}]}


@st.composite
def damaged(draw, text: str) -> str:
    """``text`` truncated, or its JSON with a field removed, added, retyped, made NaN, or a list resized."""
    kind = draw(st.sampled_from(["truncate", "remove", "add", "retype", "nan", "resize"]))
    if kind == "truncate":
        return text[:draw(st.integers(0, len(text) - 1))]
    data = json.loads(text)
    every = [p for p in paths(data) if p]
    if kind == "remove":
        path = draw(st.sampled_from([p for p in every if isinstance(at(data, p[:-1]), dict)]))
        del at(data, path[:-1])[path[-1]]
    elif kind == "add":
        path = draw(st.sampled_from([p for p in [(), *every] if isinstance(at(data, p), dict) and p != ("notes",)]))
        at(data, path)[draw(st.sampled_from(["extra", "probs", "windw"]))] = 1
    elif kind in ("retype", "nan"):
        pool = every if kind == "retype" else [p for p in every if type(at(data, p)) in (int, float, type(None))]
        path = draw(st.sampled_from(pool))
        value = at(data, path)
        new = draw(st.sampled_from(OTHER_KIND[type(value)] if kind == "retype" else [math.nan, math.inf, -math.inf]))
        at(data, path[:-1])[path[-1]] = new
    else:
        path = draw(st.sampled_from([p for p in every if isinstance(at(data, p), list)]))
        items = at(data, path)
        i = draw(st.integers(0, len(items) - 1))
        if draw(st.booleans()) or len(items) == 1:
            items.insert(i, copy.deepcopy(items[i]))
        else:
            del items[i]
    return json.dumps(data)


@given(original=budgets(), data=st.data())
@example(original=HeadBudgets.uniform(1, 1, 0.25, TCAConfig(block_size=2, window=8)), data=None).via("a row one short")
def test_damaged_files_load_identically_or_are_refused_naming_the_file(tmp_path_factory, original, data):
    path = tmp_path_factory.mktemp("budgets") / "damaged budgets.json"
    original.save(path)
    assert_same_budgets(HeadBudgets.load(path), original)
    text = path.read_text()
    if data is None:  # the pinned example: one probability short
        path.write_text(text.replace('"probs": [0.5, 0.5, 0.0]', '"probs": [0.5, 0.5]'))
    else:
        path.write_text(data.draw(damaged(text)))
    try:
        loaded = HeadBudgets.load(path)
    except ValueError as err:
        assert str(path) in str(err), err
        return
    assert data is not None
    assert_same_budgets(loaded, original)


@pytest.fixture
def saved(tmp_path):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    probs = torch.rand(2, 2, 9, generator=g, dtype=torch.float64)
    b = HeadBudgets(probs / probs.sum(-1, keepdim=True), TCAConfig(block_size=8, window=32),
                    retained_mass=torch.rand(2, 2, generator=g, dtype=torch.float64), fingerprint=FINGERPRINT)
    path = tmp_path / "budgets.json"
    b.save(path)
    return b, path, json.loads(path.read_text())


def test_derived_kept_fraction_must_match_its_probs(saved):
    budgets, path, data = saved
    data["heads"][3]["expected_kept_fraction"] = min(1.0, data["heads"][3]["expected_kept_fraction"] + 0.1)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"budgets.json: field heads\[3\].expected_kept_fraction=.*does not match"):
        HeadBudgets.load(path)
    for row in data["heads"]:  # derived, so the file may leave it out
        del row["expected_kept_fraction"]
    path.write_text(json.dumps(data))
    assert_same_budgets(HeadBudgets.load(path), budgets)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["heads"][1]["probs"].pop(), r"heads\[1\].probs must be a list of block_size \+ 1 = 9 numbers, got 8"),
    (lambda d: d["heads"][2]["probs"].__setitem__(4, "0.1"), r"heads\[2\].probs\[4\] must be a number, got str"),
    (lambda d: d["heads"][0].__setitem__("retained_mass", "high"), r"heads\[0\].retained_mass must be a number"),
    (lambda d: d["config"].pop("alpha"), r"field config: missing \['alpha'\]"),
    (lambda d: d["config"].__setitem__("window", 4), "field config: TCAConfig.window=4"),
    (lambda d: d["fingerprint"].pop("head_dim"), r"field fingerprint: missing \['head_dim'\]"),
    (lambda d: d.pop("heads"), r"missing \['heads'\]"),
], ids=["row one short", "string probability", "string mass", "config missing alpha", "invalid config",
        "partial fingerprint", "no heads"])
def test_load_errors_name_the_file_and_the_field(saved, edit, field):
    _, path, data = saved
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*{field}"):
        HeadBudgets.load(path)


def test_truncated_or_binary_files_name_the_file(saved):
    _, path, _ = saved
    text = path.read_text()
    path.write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not valid JSON .*truncated or corrupt"):
        HeadBudgets.load(path)
    path.write_bytes(b"\xff\xfe" + text.encode())
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a UTF-8 text file"):
        HeadBudgets.load(path)


def test_budgets_check_their_own_fields():
    config = TCAConfig(block_size=8, window=32)
    with pytest.raises(TypeError, match="probs must be a floating-point tensor"):
        HeadBudgets(probs=[[[1.0] * 9]], config=config)
    with pytest.raises(TypeError, match="config must be a TCAConfig"):
        HeadBudgets(probs=torch.full((1, 1, 9), 1 / 9, dtype=torch.float64), config={"block_size": 8})
    with pytest.raises(ValueError, match=r"field fingerprint: missing \['architecture'"):
        HeadBudgets(probs=torch.full((1, 1, 9), 1 / 9, dtype=torch.float64), config=config,
                    fingerprint={"model_type": "llama"})
    with pytest.raises(ValueError, match=r"retained_mass must be a tensor \[layers, kv_heads\] = \(2, 1\)"):
        HeadBudgets(probs=torch.full((2, 1, 9), 1 / 9, dtype=torch.float64), config=config, retained_mass=torch.ones(2))
