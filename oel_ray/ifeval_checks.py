"""IF-Eval instruction checkers, written for this project from the benchmark's published semantics.

Each instruction id of IF-Eval (google-research `instruction_following_eval`, also lm-eval's
`ifeval` task) names a verifiable rule with keyword arguments; a reply follows a prompt strictly
when it follows every instruction of it, and an empty reply follows none.

Two checks are approximations because their reference uses resources we do not have offline:
  - sentence counting (reference: NLTK's punkt model) uses a rule-based splitter below;
  - "english" in change_case:english_* (reference: a language detector) is approximated as "at
    least 90% of the letters are ASCII". Casing, the part a model usually fails, is exact.
`language:response_language` needs a real language detector and is not supported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Optional

RELATIONS = ("less than", "at least")


class UnknownInstruction(ValueError):
    """An instruction id this module has no checker for."""


def _compare(count: int, relation: str, threshold: int) -> bool:
    if relation == "less than":
        return count < threshold
    if relation == "at least":
        return count >= threshold
    raise ValueError(f"relation {relation!r} is not one of {', '.join(RELATIONS)}")


# ----------------------------------------------------------------------------- text measures

def count_words(text: str) -> int:
    """Runs of word characters, as the reference counts them (`\\w+`)."""
    return len(re.findall(r"\w+", text))


# Periods that do not end a sentence even before a capital: titles and initials ("Dr. Lee", "J. Smith").
_NOT_A_STOP = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|[A-Z])\.")


def count_sentences(text: str) -> int:
    """Sentences ending in . ! ? (runs of them, closing quotes/brackets allowed) followed by space
    and then anything but a lowercase letter ("e.g. this", "3 p.m. today" stay one sentence); a
    trailing fragment without a stop counts as one sentence."""
    masked = _NOT_A_STOP.sub(lambda m: m.group(0).replace(".", "\0"), text)
    parts = re.split(r"(?<=[.!?])[\"'”’)\]]*\s+(?![a-z])", masked.strip())
    return sum(1 for p in parts if re.search(r"\w", p))


def _paragraphs(text: str, separator: str) -> Optional[list[str]]:
    """Paragraphs between separators; empty ones are allowed only at the two ends (None if an
    inner one is empty: the reference rejects such replies)."""
    parts = re.split(separator, text)
    kept = []
    for i, part in enumerate(parts):
        if part.strip():
            kept.append(part)
        elif 0 < i < len(parts) - 1:
            return None
    return kept


def _looks_english(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) >= 0.9 * len(letters)


# ----------------------------------------------------------------------------- checks
# Each takes (response, **kwargs of the row) and returns whether the response follows it.

def keyword_existence(r: str, *, keywords: list[str]) -> bool:
    return all(re.search(re.escape(k), r, re.IGNORECASE) for k in keywords)


def keyword_frequency(r: str, *, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(re.findall(re.escape(keyword.strip()), r, re.IGNORECASE)), relation, frequency)


def forbidden_words(r: str, *, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(w)}\b", r, re.IGNORECASE) for w in forbidden_words)


def letter_frequency(r: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(r.lower().count(letter.strip().lower()), let_relation, let_frequency)


def number_words(r: str, *, num_words: int, relation: str) -> bool:
    return _compare(count_words(r), relation, num_words)


def number_sentences(r: str, *, num_sentences: int, relation: str) -> bool:
    return _compare(count_sentences(r), relation, num_sentences)


def number_paragraphs(r: str, *, num_paragraphs: int) -> bool:
    """Paragraphs separated by the markdown divider ***."""
    parts = _paragraphs(r, r"\s?\*\*\*\s?")
    return parts is not None and len(parts) == num_paragraphs


def nth_paragraph_first_word(r: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Paragraphs separated by blank lines; the count must match and paragraph n (from 1) must
    start with the word, compared lowercase without leading quotes or trailing punctuation."""
    parts = re.split(r"\n\n", r)
    nonempty = [p for p in parts if p.strip()]
    if len(nonempty) != num_paragraphs or nth_paragraph > len(nonempty) or not parts[nth_paragraph - 1].strip():
        return False
    word = parts[nth_paragraph - 1].split()[0].lstrip("'\"")
    word = re.split(r"[.,?!'\"]", word)[0].lower()
    return word == first_word.lower()


def number_placeholders(r: str, *, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", r)) >= num_placeholders


def postscript(r: str, *, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.search(pattern, r.lower(), re.MULTILINE))


def number_bullet_lists(r: str, *, num_bullets: int) -> bool:
    """Exactly n markdown bullets: lines starting with `* ` (not `**`) or `-`."""
    stars = re.findall(r"^\s*\*[^*].*$", r, re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def constrained_response(r: str) -> bool:
    return any(option in r.strip() for option in CONSTRAINED_OPTIONS)


def number_highlighted_sections(r: str, *, num_highlights: int) -> bool:
    """*text* and **text** spans on one line with some non-space text inside."""
    singles = [h for h in re.findall(r"\*[^\n*]*\*", r) if h.strip("*").strip()]
    doubles = [h for h in re.findall(r"\*\*[^\n*]*\*\*", r) if h[2:-2].strip()]
    return len(singles) + len(doubles) >= num_highlights


def multiple_sections(r: str, *, section_spliter: str, num_sections: int) -> bool:
    """At least n sections, each opened by the splitter word and a number ("SECTION 2")."""
    parts = re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", r)
    return len(parts) - 1 >= num_sections


def json_format(r: str) -> bool:
    """The whole reply parses as JSON, optionally inside one ``` fence (```json allowed)."""
    text = r.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        if text.startswith(fence):
            text = text[len(fence):]
            break
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def title(r: str) -> bool:
    return any(t[2:-2].strip() for t in re.findall(r"<<[^\n]+>>", r))


def two_responses(r: str) -> bool:
    """Two different non-empty replies separated by ******, nothing empty between them."""
    parts = r.split("******")
    kept = []
    for i, part in enumerate(parts):
        if part.strip():
            kept.append(part.strip())
        elif 0 < i < len(parts) - 1:
            return False
    return len(kept) == 2 and kept[0] != kept[1]


def repeat_prompt(r: str, *, prompt_to_repeat: str) -> bool:
    return r.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(r: str, *, end_phrase: str) -> bool:
    return r.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(r: str) -> bool:
    text = r.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def english_capital(r: str) -> bool:
    return r.isupper() and _looks_english(r)


def english_lowercase(r: str) -> bool:
    return r.islower() and _looks_english(r)


def capital_word_frequency(r: str, *, capital_frequency: int, capital_relation: str) -> bool:
    """Words in all capitals (hyphenated words count once)."""
    words = re.findall(r"\w+(?:[-']\w+)*", r)
    return _compare(sum(w.isupper() for w in words), capital_relation, capital_frequency)


def no_comma(r: str) -> bool:
    return "," not in r


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Instruction:
    check: Callable[..., bool]
    kwargs: tuple[str, ...] = ()  # all required: the reference draws missing ones at random


INSTRUCTIONS: dict[str, Instruction] = {
    "keywords:existence": Instruction(keyword_existence, ("keywords",)),
    "keywords:frequency": Instruction(keyword_frequency, ("keyword", "frequency", "relation")),
    "keywords:forbidden_words": Instruction(forbidden_words, ("forbidden_words",)),
    "keywords:letter_frequency": Instruction(letter_frequency, ("letter", "let_frequency", "let_relation")),
    "length_constraints:number_words": Instruction(number_words, ("num_words", "relation")),
    "length_constraints:number_sentences": Instruction(number_sentences, ("num_sentences", "relation")),
    "length_constraints:number_paragraphs": Instruction(number_paragraphs, ("num_paragraphs",)),
    "length_constraints:nth_paragraph_first_word": Instruction(
        nth_paragraph_first_word, ("num_paragraphs", "nth_paragraph", "first_word")),
    "detectable_content:number_placeholders": Instruction(number_placeholders, ("num_placeholders",)),
    "detectable_content:postscript": Instruction(postscript, ("postscript_marker",)),
    "detectable_format:number_bullet_lists": Instruction(number_bullet_lists, ("num_bullets",)),
    "detectable_format:constrained_response": Instruction(constrained_response),
    "detectable_format:number_highlighted_sections": Instruction(number_highlighted_sections, ("num_highlights",)),
    "detectable_format:multiple_sections": Instruction(multiple_sections, ("section_spliter", "num_sections")),
    "detectable_format:json_format": Instruction(json_format),
    "detectable_format:title": Instruction(title),
    "combination:two_responses": Instruction(two_responses),
    "combination:repeat_prompt": Instruction(repeat_prompt, ("prompt_to_repeat",)),
    "startend:end_checker": Instruction(end_checker, ("end_phrase",)),
    "startend:quotation": Instruction(quotation),
    "change_case:english_capital": Instruction(english_capital),
    "change_case:english_lowercase": Instruction(english_lowercase),
    "change_case:capital_word_frequency": Instruction(
        capital_word_frequency, ("capital_frequency", "capital_relation")),
    "punctuation:no_comma": Instruction(no_comma),
}
SUPPORTED = tuple(sorted(INSTRUCTIONS))
_INT_KWARGS = {"frequency", "let_frequency", "capital_frequency", "num_words", "num_sentences", "num_paragraphs",
               "nth_paragraph", "num_placeholders", "num_bullets", "num_highlights", "num_sections"}
_LIST_KWARGS = {"keywords", "forbidden_words"}


def unknown_message(instruction_id: str, where: str) -> str:
    return (f"{where}: instruction id {instruction_id!r} is not supported; supported: "
            f"{', '.join(SUPPORTED)} (or skip and count such instructions with unknown='skip')")


def instruction_kwargs(instruction_id: str, kwargs: dict, where: str) -> dict:
    """The row's kwargs for one instruction, checked: None entries dropped (the HF copy of IF-Eval
    pads every dict with all possible keys), required keys present, no stray keys, relations valid."""
    spec = INSTRUCTIONS.get(instruction_id)
    if spec is None:
        raise UnknownInstruction(unknown_message(instruction_id, where))
    given = {k: v for k, v in (kwargs or {}).items() if v is not None}
    missing = [k for k in spec.kwargs if k not in given]
    stray = [k for k in given if k not in spec.kwargs]
    if missing or stray:
        raise ValueError(f"{where}: kwargs for {instruction_id} "
                         + (f"lack {', '.join(missing)}" if missing else f"have unknown {', '.join(stray)}")
                         + f"; it takes exactly: {', '.join(spec.kwargs) or 'nothing'}")
    for key, value in given.items():
        low = 1 if key == "nth_paragraph" else 0
        if key in _INT_KWARGS and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{where}: {instruction_id} {key} must be a whole number >= {low}, got {value!r}")
        if key in _LIST_KWARGS and not (isinstance(value, list) and all(isinstance(w, str) for w in value)):
            raise ValueError(f"{where}: {instruction_id} {key} must be a list of strings, got {value!r}")
    for key in ("relation", "let_relation", "capital_relation"):
        if key in given and given[key] not in RELATIONS:
            raise ValueError(f"{where}: {instruction_id} {key} {given[key]!r} is not one of "
                             f"{', '.join(map(repr, RELATIONS))}")
    return given


def follows(instruction_id: str, response: str, kwargs: Optional[dict] = None, where: str = "instruction") -> bool:
    """Whether `response` follows one instruction (strict: the reply as generated). An empty or
    blank reply follows nothing, as in the reference."""
    given = instruction_kwargs(instruction_id, kwargs or {}, where)
    return bool(response.strip()) and INSTRUCTIONS[instruction_id].check(response, **given)
