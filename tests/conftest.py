import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# "fast" for CI, "thorough" for local digging: HYPOTHESIS_PROFILE=thorough.
settings.register_profile("fast", max_examples=15, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without a GPU, Triton kernels run in Triton's CPU interpreter, which must be
# chosen before Triton is first imported (tca_flex imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                attn_implementation="sdpa")
    base.update(overrides)
    return LlamaConfig(**base)


@pytest.fixture
def tiny_llama():
    """A fresh, randomly initialised 2-layer Llama with GQA (4 query / 2 KV heads)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    # A random model has no meaningful end-of-sequence token: without this, generate() stops
    # whenever a sparse run happens to emit token 2, and lengths differ from dense by chance.
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture
def tca_compile_settings():
    """Puts back the two process-wide settings ``tca_flex.compile`` changes (docs/serving.md),
    so the rest of the suite runs with torch's own."""
    sources, limit = torch.compiler.config.dynamic_sources, torch._dynamo.config.recompile_limit
    yield
    torch.compiler.config.dynamic_sources = sources
    torch._dynamo.config.recompile_limit = limit


@pytest.fixture(scope="session")
def smollm2():
    from tca_flex.models import load_smollm2

    try:
        return load_smollm2()
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
