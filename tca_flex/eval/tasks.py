"""Synthetic long-context tasks, generated locally and deterministically."""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


@dataclass(frozen=True)
class Sample:
    """A prompt and the strings a correct answer must contain."""

    prompt: str
    answers: tuple[str, ...]
    task: str
    depth: float


def passkey(tokenizer, num_tokens: int, seed: int, depth: float | None = None) -> Sample:
    """The classic passkey prompt: a 5-digit key hidden in repeated filler.

    Args:
        tokenizer: a transformers tokenizer (lengths are counted in its tokens).
        num_tokens: approximate prompt length in tokens.
        seed: fixes the key and (unless given) its depth.
        depth: relative position of the key in the filler, 0..1.
    """
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    depth = rng.random() if depth is None else depth
    head = ("There is an important pass key hidden inside a lot of irrelevant text. "
            "Find it and memorise it.\n")
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    tail = "\nWhat is the pass key? The pass key is"
    per_filler = len(tokenizer(FILLER).input_ids)
    budget = num_tokens - len(tokenizer(head + needle + tail).input_ids)
    reps = max(1, budget // per_filler)
    before = int(reps * depth)
    prompt = head + FILLER * before + needle + FILLER * (reps - before) + tail
    return Sample(prompt=prompt, answers=(key,), task="passkey", depth=depth)


def score(answer: str, sample: Sample) -> bool:
    """Exact-match scoring, as RULER does: every expected string must appear."""
    return all(a in answer for a in sample.answers)
