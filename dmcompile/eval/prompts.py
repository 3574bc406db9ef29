"""Prompts about the digits: the phrasings digits-t2i is trained on, and the fixed evaluation
set of prompt accuracy (the share of samples the digit classifier assigns to the prompt's
digit), which adds phrasings never seen in training."""

from __future__ import annotations

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w}: the digit's word, {d}: its numeral
TRAIN_TEMPLATES = (
    "{d}", "{w}", "a {w}", "a {d}", "the number {d}", "the number {w}", "number {d}", "the digit {w}",
    "the digit {d}", "a handwritten {w}", "a handwritten {d}", "handwritten digit {d}", "{w}, written thin",
    "{w}, written bold", "a small {w}", "a neat {d}", "a drawing of the number {w}", "a picture of a {w}",
    "{w} written by hand", "the numeral {d}", "a messy {w}", "a {w} on a plain background",
)
# never seen in training: prompt accuracy measures whether the text encoder generalises
HELD_OUT_TEMPLATES = (
    "a sketch of the digit {w}", "please draw a {w}", "the figure {d} in pencil", "digit: {w}",
    "an ink {w}", "write the number {w}", "{w}!", "one single {w}",
)


def prompt(template: str, digit: int) -> str:
    return template.format(w=WORDS[digit], d=digit)


def training_prompts() -> list[tuple[str, int]]:
    """(prompt, digit) for every training phrasing and digit."""
    return [(prompt(t, d), d) for t in TRAIN_TEMPLATES for d in range(10)]


def evaluation_prompts() -> list[tuple[str, int]]:
    """The fixed evaluation set: 4 training phrasings and every held-out one, for each digit
    (120 prompts, 80 of them in phrasings not used in training)."""
    seen = ("the number {d}", "a handwritten {w}", "{w}, written thin", "{d}")
    return [(prompt(t, d), d) for t in (*seen, *HELD_OUT_TEMPLATES) for d in range(10)]
