"""Prototype (eval only): decode compresses a block only once it is G blocks past the window (a "grace"),
so a copy that trails the window's start still reads the block whole. The prefill's selection and window
are unchanged; each head's ring holds G more blocks (G x 64 more KV slots per head with the shipped
budgets). G = 8 (512 tokens) outlasts a long_recall answer: no compression at all, as `tca_emulated`.

Ran at commit 0bedb22, before the package had the knob; since 95cb2ab the same is `TCAConfig.grace_blocks`
(`--tca-option grace_blocks=G` with a budget file, or the file's own value), and this patch refuses to run.
At 0bedb22, from the repository root (CPU float32, one thread; seeds as listed in EVALUATION.md):

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/eval/CPU-2026-12-04-long-recall-window/grace/grace.py G \
        --tasks long_recall --methods tca_grace --keep --budgets tca_flex/data/smollm2_budgets.json \
        --lengths 4096 --samples 1 --seed S --ppl-samples 0 --no-progress --out DIR
"""
import dataclasses
import functools
import sys

from tca_flex.cache import TCACacheLayer
from tca_flex.eval import cli, methods

if hasattr(TCACacheLayer, "compress_window") or "compress_window" in TCACacheLayer.__init__.__code__.co_names:
    sys.exit("grace.py patches the cache of commit 0bedb22; this tca_flex has TCAConfig.grace_blocks: "
             "use --tca-option grace_blocks=G (EVALUATION.md, 2026-12-04)")
G = int(sys.argv.pop(1))
_init, _finish = TCACacheLayer.__init__, TCACacheLayer.finish_prefill


def _grace_init(self, config, *args, **kwargs):
    _init(self, config, *args, **kwargs)
    self.ring += G * self.block  # room for the blocks that wait past the window


def _grace_finish(self, *args, **kwargs):
    _finish(self, *args, **kwargs)  # the prefill's own window: its last `window` tokens whole
    self.window += G * self.block  # decode: a block is compressed G blocks later


def _prepare(model, budgets):
    prepared = methods._real_prepare(model, budgets, conversation="append")
    TCACacheLayer.__init__, TCACacheLayer.finish_prefill = _grace_init, _grace_finish

    def cleanup():
        TCACacheLayer.__init__, TCACacheLayer.finish_prefill = _init, _finish
        prepared.cleanup()

    return dataclasses.replace(prepared, cleanup=cleanup)


methods.TCA_VARIANTS["tca_grace"] = _prepare
methods.FAMILIES["tca_grace"] = functools.partial(methods.tca_uniform, "tca_grace")
if __name__ == "__main__":
    cli.main(sys.argv[1:])
