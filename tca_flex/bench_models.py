"""The models the benchmarks time: LLaMA-3.1-8B shapes with random weights, and the dense baseline's attention."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch


def dense_kv_bytes(config: Any, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of a dense K/V cache of ``tokens`` positions for a model of ``config`` (every layer, KV head)."""
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * tokens * head_dim * torch.finfo(dtype).bits // 8


def generate_compile_config(device: torch.device) -> Any:
    """The ``compile_config`` the benchmarks hand ``generate`` where it compiles its decode step:
    ``None`` (transformers' own default) on CUDA; elsewhere one that makes it compile anyway (a flag
    transformers keeps for its tests), by aot_eager (no codegen), so CPU smoke runs go through the
    same code."""
    if device.type == "cuda":
        return None
    from transformers import CompileConfig

    config = CompileConfig(backend="aot_eager", mode=None)
    config._compile_all_devices = True
    return config


def fastest_dense_sdpa() -> str:
    """Registers and names transformers' SDPA attention with no materialised mask for unpadded
    causal shapes (``integration.tca_mask``): prefill takes SDPA's causal kernel (cuDNN on
    Hopper) and decode its native-GQA path, instead of a ``[.., L]`` mask that pushes decode
    to a slower kernel and repeats the KV heads. The dense baseline every e2e row is timed against."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .integration import tca_mask

    def maskless_mask(*args, **kwargs):
        # tca_mask hands a padded prefill its 2-D padding mask (TCA's attention reads it); SDPA needs 4-D
        mask = tca_mask(*args, **kwargs)
        return sdpa_mask(*args, **kwargs) if mask is not None and mask.dim() == 2 else mask

    AttentionInterface.register("sdpa_maskless", sdpa_attention_forward)
    AttentionMaskInterface.register("sdpa_maskless", maskless_mask)
    return "sdpa_maskless"


def llama_8b_shaped(num_layers: int, device: torch.device, dtype: torch.dtype, smoke: bool, max_len: int):
    """A LLaMA-3.1-8B-shaped ``LlamaForCausalLM`` with random weights (tiny shapes with ``smoke``),
    initialised on ``device`` directly in ``dtype``: no float32 copy, no CPU init of 16 GB at 32 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len)
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=num_layers, num_attention_heads=32, num_key_value_heads=8,
                          max_position_embeddings=max(131072, max_len), rope_theta=500000.0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def static_copy(model, dynamic, length: int, device: torch.device):
    """A ``StaticCache`` holding ``dynamic``'s K/V (transformers' graph-safe dense cache; its
    decode attention takes a ``[1, 1, 1, max_len]`` mask)."""
    from transformers import StaticCache

    static = StaticCache(config=model.config, max_cache_len=length + 256)
    cache_position = torch.arange(length, device=device)
    for i, layer in enumerate(dynamic.layers):
        static.update(layer.keys, layer.values, i, {"cache_position": cache_position})
    return static


def one_step_dense(dynamic):
    """``dynamic`` with each layer preallocated one token longer: every ``update`` writes slot ``L``
    and returns all ``L + 1`` keys, so the step runs maskless SDPA over exactly the dense cache
    (the fastest dense decode step, for timing one step at length ``L``)."""
    from transformers.cache_utils import DynamicLayer

    class OneStepDenseLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.length = keys.shape[-2]
            self.k_buf = torch.cat([keys, keys[:, :, -1:]], dim=-2)
            self.v_buf = torch.cat([values, values[:, :, -1:]], dim=-2)
            self.keys, self.values = self.k_buf[:, :, :-1], self.v_buf[:, :, :-1]
            self.device, self.is_initialized = keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            self.k_buf[:, :, self.length:].copy_(key_states)
            self.v_buf[:, :, self.length:].copy_(value_states)
            return self.k_buf, self.v_buf

        def get_seq_length(self) -> int:
            return self.length

    dynamic.layers = [OneStepDenseLayer(layer.keys, layer.values) for layer in dynamic.layers]
    return dynamic


def captured_decode(step: Callable[[int], Any], cache: Any, warmup: int = 3,
                    variants: tuple[bool | None, ...] = (None,)) -> dict[bool | None, torch.cuda.CUDAGraph]:
    """Decode steps captured in CUDA graphs, one per ``variants`` entry (``TCACache.graph_capture``'s
    ``compress``: None = decided on the device each step, True/False = with/without the compression).

    ``step(i)`` runs decode step ``i``. Steps ``0 .. warmup - 1`` run eagerly on a side stream with
    the compression on (it decides on the device, so it is safe on every step), which loads every
    kernel before a capture, which must not load modules. With a ``False`` variant one more eager
    step runs without the compression (after a compressing one if a block leaves then): a compiled
    step compiles once per variant (``assume_leaves`` is a guard), and a capture must not compile.
    Then the next step is captured once per variant (the graphs share one memory pool). A
    ``TCACache``'s host counters advance per eager step here and must be advanced per replay by the
    caller (``cache.replayed()``); a dense cache takes no part."""
    from .cache import TCACache

    tca = isinstance(cache, TCACache)

    def captured(compress: bool | None):
        return cache.graph_capture(compress) if tca else contextlib.nullcontext()

    done = 0

    def eager(compress: bool) -> None:
        nonlocal done
        with captured(compress):
            step(done)
        done += 1
        if tca:
            cache.replayed()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            eager(True)
        if tca and False in variants:
            if cache.block_leaves_next():
                eager(True)
            eager(False)
    torch.cuda.current_stream().wait_stream(stream)
    graphs, pool = {}, None
    for compress in variants:
        graph = torch.cuda.CUDAGraph()
        with captured(compress), torch.cuda.graph(graph, pool=pool):
            step(done)
        graphs[compress], pool = graph, graph.pool()
    return graphs
