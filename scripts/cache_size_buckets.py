"""What ``TCACache``'s size buckets cost in memory and whether they make layouts content-free (CPU).

    python scripts/cache_size_buckets.py [LENGTH ...]   # defaults 2600 3000 3400 6000

On the bundled SmolLM2 with its shipped budgets: for each length, two random prompts (different
content) are prefilled into ``TCACache(model, reserve_tokens=32)`` with ``size_buckets`` 0 (a layout
per length) and 8 (the default with a reserve); prints the bytes each holds, the extra of the
buckets, and whether the two prompts got the same layout (buffer sizes); one JSON line per length.
"""

from __future__ import annotations

import json
import sys

import torch

import tca_flex
from tca_flex.hfcompat import cache_kwargs
from tca_flex.layer import tca_layers
from tca_flex.layout import bucket_blocks, global_blocks
from tca_flex.models import load_smollm2


@torch.no_grad()
def main() -> None:
    lengths = [int(a) for a in sys.argv[1:]] or [2600, 3000, 3400, 6000]
    model, _ = load_smollm2()
    tca_flex.apply(model)
    config = tca_layers(model)[0].config
    window, block = config.window, config.block_size
    gen = torch.Generator().manual_seed(0)
    for length in lengths:
        held, layouts = {}, {}
        for buckets in (0, 8):
            for prompt in range(2):
                ids = torch.randint(100, model.config.vocab_size - 1, (1, length), generator=gen)
                cache = tca_flex.TCACache(model, reserve_tokens=32, size_buckets=buckets)
                model(ids, **cache_kwargs(model, cache))
                held[buckets, prompt] = cache.memory_report().total
                layouts[buckets, prompt] = [layer.layout.slots for layer in cache.layers]
        blocks = global_blocks(length, window, block)
        row = {"length": length, "blocks": blocks, "bucket_blocks": bucket_blocks(blocks, 8),
               "bytes_exact": held[0, 0].bytes_used, "bytes_bucketed": held[8, 0].bytes_used,
               "extra": held[8, 0].bytes_used / held[0, 0].bytes_used - 1,
               "kept_fraction": held[0, 0].kept_fraction,
               "same_layout_two_prompts_exact": layouts[0, 0] == layouts[0, 1],
               "same_layout_two_prompts_bucketed": layouts[8, 0] == layouts[8, 1]}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
