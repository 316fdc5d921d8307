"""Synthetic long-context tasks, generated locally and deterministically.

Passkey retrieval plus RULER-style tasks (Hsieh et al., 2024) built from
templates: single / multi-key / multi-value / multi-query needles, variable
tracking, common-word and frequent-word extraction. Every generator has the
signature ``(tokenizer, num_tokens, seed) -> Sample`` and is a pure function
of its arguments: the same seed gives the same prompt. Lengths are counted in
the tokenizer's tokens and are approximate (within a few filler sentences).

Words are pseudo-words built from syllables, so nothing is downloaded and no
word list ships with the package.

``multi_turn`` is a conversation: its ``prompt`` is the first user turn and
``turns`` the later ones; the runner lets the model reply between turns
(``reply_tokens`` each) and scores the reply to the last one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Sample:
    """A prompt and the strings a correct answer must contain.

    Attributes:
        prompt: the full prompt, ending where the model's answer starts (in a
            conversation: the first user turn, ending where its reply starts).
        answers: every string the answer must contain (RULER's "match all").
        task: generator name.
        depth: relative depth of the (first) needle, 0..1 (None if none).
        max_new_tokens: tokens to generate for this task.
        seed: the generator's seed (set by the suite runner; records carry it so
            that runs sharded over seeds can be merged without duplicates).
        turns: later user turns of a conversation, each ending where the
            model's reply starts; the reply to the last one is scored.
        reply_tokens: tokens the model replies to every turn but the last.
    """

    prompt: str
    answers: tuple[str, ...]
    task: str
    depth: float | None
    max_new_tokens: int = 16
    seed: int | None = None
    turns: tuple[str, ...] = ()
    reply_tokens: int = 0


def score(answer: str, sample: Sample) -> bool:
    """Exact-match scoring: True when every expected string appears in ``answer`` (any case)."""
    return score_fraction(answer, sample) == 1.0


def score_fraction(answer: str, sample: Sample) -> float:
    """RULER's ``string_match_all``: fraction of expected strings found (case-insensitive)."""
    text = answer.lower()
    return sum(a.lower() in text for a in sample.answers) / len(sample.answers)


def count_tokens(tokenizer, text: str) -> int:
    """Number of tokens of ``text`` (no special tokens added by us)."""
    return len(tokenizer(text).input_ids)


def sample_tokens(tokenizer, sample: Sample) -> int:
    """Tokens a sample's run needs: every turn, the replies between turns and the answer."""
    text = sum(count_tokens(tokenizer, t) for t in (sample.prompt, *sample.turns))
    return text + len(sample.turns) * sample.reply_tokens + sample.max_new_tokens


def pseudo_words(rng: random.Random, count: int, syllables: int = 3) -> list[str]:
    """``count`` distinct lowercase pseudo-words of ``syllables`` CV syllables."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def haystack(tokenizer, num_tokens: int, fixed: str, needles: list[str], depths: list[float]) -> str:
    """Repeated filler with ``needles`` inserted at relative ``depths``.

    ``fixed`` is the text outside the haystack (header and question); the
    filler is sized so that header + haystack + question is about
    ``num_tokens`` tokens.
    """
    per_filler = count_tokens(tokenizer, FILLER)
    used = count_tokens(tokenizer, fixed + "".join(needles))
    reps = max(1, (num_tokens - used) // per_filler)
    cuts = [int(reps * d) for d in depths]
    order = sorted(range(len(needles)), key=lambda i: cuts[i])
    parts, prev = [], 0
    for i in order:
        parts.append(FILLER * (cuts[i] - prev))
        parts.append(needles[i])
        prev = cuts[i]
    parts.append(FILLER * (reps - prev))
    return "".join(parts)


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
    body = haystack(tokenizer, num_tokens, head + tail, [needle], [depth])
    return Sample(prompt=head + body + tail, answers=(key,), task="passkey", depth=depth, max_new_tokens=8)


_NIAH_HEAD = ("A special magic number is hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the number afterwards.\n")


def _niah(tokenizer, num_tokens: int, seed: int, task: str, num_keys: int, num_values: int,
          num_queries: int) -> Sample:
    """RULER's needle-in-a-haystack family (``niah_*``) with noise filler.

    ``num_keys`` keys get ``num_values`` 7-digit values each; the first
    ``num_queries`` keys are asked for, the rest are distractors.
    """
    rng = random.Random(seed)
    firsts, seconds = pseudo_words(rng, num_keys, 2), pseudo_words(rng, num_keys, 3)
    keys = [f"{a}-{b}" for a, b in zip(firsts, seconds, strict=True)]
    values = [[_number(rng) for _ in range(num_values)] for _ in keys]
    needles = [f" One of the special magic numbers for {k} is: {v}. "
               for k, vs in zip(keys, values, strict=True) for v in vs]
    depths = [rng.random() for _ in needles]
    asked = keys[:num_queries]
    what = "numbers" if num_values * num_queries > 1 else "number"
    names = ", ".join(asked)
    tail = (f"\nWhat are all the special magic {what} for {names} mentioned in the provided text? "
            f"The special magic {what} for {names} mentioned in the provided text are")
    if num_values * num_queries == 1:
        tail = (f"\nWhat is the special magic number for {names} mentioned in the provided text? "
                f"The special magic number for {names} mentioned in the provided text is")
    body = haystack(tokenizer, num_tokens, _NIAH_HEAD + tail, needles, depths)
    answers = tuple(v for vs in values[:num_queries] for v in vs)
    new_tokens = 12 * len(answers) + 4
    # Depth of the first asked needle (the one that matters most).
    return Sample(prompt=_NIAH_HEAD + body + tail, answers=answers, task=task, depth=depths[0],
                  max_new_tokens=new_tokens)


def niah_single(tokenizer, num_tokens: int, seed: int) -> Sample:
    """One needle (key -> 7-digit value) in noise; ask for its value."""
    return _niah(tokenizer, num_tokens, seed, "niah_single", num_keys=1, num_values=1, num_queries=1)


def niah_multikey(tokenizer, num_tokens: int, seed: int) -> Sample:
    """Four needles with different keys (three distractors); ask for one key's value."""
    return _niah(tokenizer, num_tokens, seed, "niah_multikey", num_keys=4, num_values=1, num_queries=1)


def niah_multivalue(tokenizer, num_tokens: int, seed: int) -> Sample:
    """One key with four values in four needles; all four must be returned."""
    return _niah(tokenizer, num_tokens, seed, "niah_multivalue", num_keys=1, num_values=4, num_queries=1)


def niah_multiquery(tokenizer, num_tokens: int, seed: int) -> Sample:
    """Four keys with one value each; all four are asked for at once."""
    return _niah(tokenizer, num_tokens, seed, "niah_multiquery", num_keys=4, num_values=1, num_queries=4)


def variable_tracking(tokenizer, num_tokens: int, seed: int, num_hops: int = 4) -> Sample:
    """RULER's variable tracking: ``VAR A = 12345``, ``VAR B = VAR A``, ... in noise.

    The answer is every variable of the chain (``num_hops + 1`` names).
    """
    rng = random.Random(seed)
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(num_hops + 1)]
    if len(set(names)) < len(names):  # vanishingly rare; keep the seed deterministic anyway
        names = [f"{n}{i}" for i, n in enumerate(names)]
    value = str(rng.randint(10000, 99999))
    chain = [f" VAR {names[0]} = {value}. "] + [f" VAR {names[i + 1]} = VAR {names[i]}. "
                                                 for i in range(num_hops)]
    depths = sorted(rng.random() for _ in chain)
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    tail = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
            f"Answer: According to the chain(s) of variable assignment in the text above, "
            f"{num_hops + 1} variables are assigned the value {value}, they are:")
    body = haystack(tokenizer, num_tokens, head + tail, chain, depths)
    return Sample(prompt=head + body + tail, answers=tuple(names), task="variable_tracking",
                  depth=depths[0], max_new_tokens=8 * (num_hops + 1))


def _fit(tokenizer, num_tokens: int, build: Callable[[int], str], guess: int) -> tuple[str, int]:
    """Run ``build(n)`` with ``n`` rescaled once so that its text has about ``num_tokens`` tokens."""
    text = build(guess)
    n = max(1, int(guess * num_tokens / max(count_tokens(tokenizer, text), 1)))
    return build(n), n


def common_words(tokenizer, num_tokens: int, seed: int, num_common: int = 10, freq_common: int = 30,
                 freq_rare: int = 3) -> Sample:
    """RULER's common-word extraction: a numbered word list, some words repeated often.

    ``num_common`` words appear ``freq_common`` times each (fewer for short
    prompts, as in RULER); as many rare words as fit the length appear
    ``freq_rare`` times each. Answer: the common words.
    """
    head = "Below is a numbered list of words. In these words, some appear more often than others. " \
           "Memorize the ones that appear most often.\n"
    tail = (f"\nQuestion: What are the {num_common} most common words in the above list? "
            f"Answer: The top {num_common} words that appear most often in the list are:")

    def build(total_items: int) -> str:
        rng = random.Random(seed)
        fc = max(freq_rare + 2, min(freq_common, total_items // (2 * num_common)))
        num_rare = max(1, (total_items - num_common * fc) // freq_rare)
        words = pseudo_words(rng, num_common + num_rare, 3)
        items = words[:num_common] * fc + words[num_common:] * freq_rare
        rng.shuffle(items)
        return head + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items)) + tail

    prompt, _ = _fit(tokenizer, num_tokens, build, max(1, num_tokens // 6))
    common = tuple(pseudo_words(random.Random(seed), num_common, 3))
    return Sample(prompt=prompt, answers=common, task="common_words", depth=None,
                  max_new_tokens=6 * num_common + 4)


def frequent_words(tokenizer, num_tokens: int, seed: int, num_top: int = 3, alpha: float = 2.0) -> Sample:
    """RULER's frequent-word extraction: coded words drawn from a Zipf law.

    Word ``r`` (rank from 1) appears about ``total * r ** -alpha / Z`` times;
    counts are fixed by the weights (not sampled), so the first ``num_top``
    words, the answer, are unambiguous.
    """
    head = "Read the following coded text and track the frequency of each coded word. " \
           "Find the three most frequently appeared coded words.\n"
    tail = (f"\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the "
            f"{num_top} most frequently appeared words in the above coded text? Answer: According to "
            f"the coded text above, the {num_top} most frequently appeared words are:")

    def vocab_for(total: int) -> list[str]:
        return pseudo_words(random.Random(seed), min(400, max(4 * num_top, total // 4)), 3)

    def build(total: int) -> str:
        rng = random.Random(seed + 1)
        vocab = vocab_for(total)
        weights = [(r + 1) ** -alpha for r in range(len(vocab))]
        scale = total / sum(weights)
        items = [w for w, wt in zip(vocab, weights, strict=True) for _ in range(max(1, int(wt * scale)))]
        rng.shuffle(items)
        return head + " .... ".join(items) + tail

    prompt, total = _fit(tokenizer, num_tokens, build, max(50, num_tokens // 4))
    return Sample(prompt=prompt, answers=tuple(vocab_for(total)[:num_top]), task="frequent_words",
                  depth=None, max_new_tokens=6 * num_top + 4)


def multi_turn(tokenizer, num_tokens: int, seed: int, distractor_turns: int = 2, reply_tokens: int = 8) -> Sample:
    """A conversation: facts in the first turn, distractor turns, the question in the last.

    Turn 1 (about 60% of the tokens) hides four key -> 7-digit-number facts in
    filler and asks the model to acknowledge them. Each distractor turn is
    another document with two facts of the same form about other keys, and
    asks for a one-line reply. The last turn asks for one key of turn 1. A
    pruned cache that appends turn after turn decides what it keeps of turn 1
    before the question exists (``docs/chunked_prefill.md``); one that
    re-prefills sees the question when it selects. ``num_tokens`` covers the
    text, the replies (``reply_tokens`` each) and the answer.
    """
    rng = random.Random(seed)
    keys = [f"{a}-{b}" for a, b in zip(pseudo_words(rng, 4 + 2 * distractor_turns, 2),
                                      pseudo_words(rng, 4 + 2 * distractor_turns, 3), strict=True)]
    values = [_number(rng) for _ in keys]
    facts = [f" The special magic number for {k} is {v}. " for k, v in zip(keys, values, strict=True)]
    asked = rng.randrange(4)
    answer_tokens = 16
    text_tokens = num_tokens - distractor_turns * reply_tokens - answer_tokens
    first_head = ("User: Here is a document. Remember every special magic number in it; I will ask you about "
                  "one of them later.\n")
    first_tail = "\nReply with OK once you have read it.\nAssistant:"
    first = first_head + haystack(tokenizer, int(0.6 * text_tokens), first_head + first_tail, facts[:4],
                                  [rng.random() for _ in range(4)]) + first_tail
    question = (f"\nUser: What is the special magic number for {keys[asked]} in the first document?\n"
                f"Assistant: The special magic number for {keys[asked]} in the first document is")
    per_turn = (text_tokens - count_tokens(tokenizer, first) - count_tokens(tokenizer, question)) // max(
        1, distractor_turns)
    turns = []
    for i in range(distractor_turns):
        head = "\nUser: Here is another document, about something else.\n"
        tail = "\nSummarise it in one sentence.\nAssistant:"
        pair = facts[4 + 2 * i: 6 + 2 * i]
        turns.append(head + haystack(tokenizer, per_turn, head + tail, pair, [rng.random() for _ in pair]) + tail)
    turns.append(question)
    return Sample(prompt=first, answers=(values[asked],), task="multi_turn", depth=None,
                  max_new_tokens=answer_tokens, turns=tuple(turns), reply_tokens=reply_tokens)


def long_recall(tokenizer, num_tokens: int, seed: int, num_items: int = 40) -> Sample:
    """A long answer reproduced from the context: list ``num_items`` entries seen earlier, in order.

    The entries (distinct pseudo-words, numbered) stand together as one list at a
    random depth of the filler; the prompt ends where the model starts listing
    them. The answer is the list copied back (~420 tokens for 40 entries with
    SmolLM2's tokenizer), so during decode several blocks leave a pruned cache's window
    and are compressed while the model still reads the list. Scored by the
    fraction of entries the answer contains (``score_fraction``). ``num_tokens``
    is the prompt's length, as for the other single-turn tasks (the suite leaves
    room for the answer).

    Why one list and not entries spread through the filler: a small model answers
    by copying the context from the first entry on, filler included, and ran out
    of answer tokens after 6 of 40 entries (SmolLM2-135M, dense: 5.5% at 2K).
    """
    rng = random.Random(seed)
    words = pseudo_words(rng, num_items, 3)
    listing = "".join(f" Inventory entry {i + 1}: {w}. " for i, w in enumerate(words))
    head = ("Below is a long text. It holds a list of inventory entries; remember every entry and "
            "its number.\n")
    tail = (f"\nList all {num_items} inventory entries in order, one per line, as "
            "'Inventory entry N: word'.\nInventory entry 1:")
    body = haystack(tokenizer, num_tokens, head + tail, [listing], [rng.random()])
    return Sample(prompt=head + body + tail, answers=tuple(words), task="long_recall", depth=None,
                  max_new_tokens=count_tokens(tokenizer, listing) + 16)


Generator = Callable[..., Sample]

TASKS: dict[str, Generator] = {
    "passkey": passkey,
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
    "multi_turn": multi_turn,
    "long_recall": long_recall,
}
