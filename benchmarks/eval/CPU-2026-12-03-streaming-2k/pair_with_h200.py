"""TCA - StreamingLLM at 2K, paired by seed: the H200 runs' seeds 0-19 (TCA from the shipped-path run,
StreamingLLM from the 2026-12-02 baselines run), this folder's CPU seeds 20-29, and both together.
Run from the repository root:

    python benchmarks/eval/CPU-2026-12-03-streaming-2k/pair_with_h200.py \
        benchmarks/eval/CPU-2026-12-03-streaming-2k/2k-stream-s2{0,5}/results.json
"""

import json
import sys

from tca_flex.eval.report import paired_difference


def load(path):
    with open(path) as f:
        return json.load(f)["records"]


def method_name(method):
    """tca[...] -> tca, streaming* -> streaming, dense -> dense; anything else (the emulation) -> None."""
    if method.startswith("tca_mask"):
        return None
    if method.startswith("tca["):
        return "tca"
    if method.startswith("streaming"):
        return "streaming"
    return "dense" if method == "dense" else None


def norm(records, keep_seeds=None):
    out = []
    for r in records:
        if r.get("kind") != "task" or r["length"] != 2048:
            continue
        if keep_seeds is not None and r["seed"] not in keep_seeds:
            continue
        name = method_name(r["method"])
        if name is not None:
            out.append({**r, "method": name})
    return out


gpu = norm(load("benchmarks/eval/H200-2026-12-03-real-50/results.json"), set(range(20)))
gst = norm(load("benchmarks/eval/H200-2026-12-02-n20/main/results.json"), set(range(20)))
gpu = [r for r in gpu if r["method"] == "tca"] + [r for r in gst if r["method"] == "streaming"]
print("gpu", paired_difference(gpu, 2048, "tca", "streaming"))
cpu = []
for path in sys.argv[1:]:
    cpu += norm(load(path))
print("cpu", paired_difference(cpu, 2048, "tca", "streaming"),
      "tca-dense", paired_difference(cpu, 2048, "tca", "dense"))
print("all", paired_difference(gpu + cpu, 2048, "tca", "streaming"))
