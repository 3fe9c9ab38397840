"""What the built-in prompt generator combines: 60 task templates, 80 topics and IFEval constraint templates.

Every constraint template renders its sentence from the same kwargs its checker receives, so the text the policy
reads and the check the reward runs cannot disagree. Ids and kwargs names are those of IFEval's registry
(`if_verifiable.ifeval.instructions_registry`); only checkers that run offline here are used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TASKS = (
    "Write a short story about {topic}.",
    "Write a poem about {topic}.",
    "Write a blog post about {topic}.",
    "Write a persuasive essay about {topic}.",
    "Write a letter to a friend about {topic}.",
    "Write a product description for a new gadget inspired by {topic}.",
    "Write a news report about {topic}.",
    "Write a speech for a school assembly about {topic}.",
    "Write a diary entry about {topic}.",
    "Write a song about {topic}.",
    "Write a limerick about {topic}.",
    "Write a sequence of haiku about {topic}.",
    "Write a dialogue between two friends discussing {topic}.",
    "Write a travel guide entry inspired by {topic}.",
    "Write a riddle whose answer is related to {topic}.",
    "Write a review of an imaginary book about {topic}.",
    "Write an advertisement for a workshop on {topic}.",
    "Write a lesson plan for teaching children about {topic}.",
    "Write a list of tips for beginners interested in {topic}.",
    "Summarize the history of {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Describe a typical day for someone who works with {topic}.",
    "Give advice to a student who wants to learn about {topic}.",
    "Write a short biography of a fictional expert on {topic}.",
    "Write a job posting for a position involving {topic}.",
    "Write a museum exhibit description about {topic}.",
    "Write a social media post announcing a festival celebrating {topic}.",
    "Write a complaint letter to a company about a problem involving {topic}.",
    "Write a thank-you note to a teacher who taught you about {topic}.",
    "Write a debate opening statement for more public funding for {topic}.",
    "Write a podcast episode outline about {topic}.",
    "Write a page of frequently asked questions about {topic}.",
    "Write a children's bedtime story involving {topic}.",
    "Write a motivational message inspired by {topic}.",
    "Write a step-by-step guide for getting started with {topic}.",
    "Write a scene from a play set in a world shaped by {topic}.",
    "Compare the past and the future of {topic}.",
    "Write an opinion piece about why people should care about {topic}.",
    "Write an email inviting colleagues to a talk about {topic}.",
    "Write a fable with a moral that involves {topic}.",
    "Write a pitch for a documentary about {topic}.",
    "Write the introduction to a trivia night about {topic}.",
    "Write a short mystery story in which {topic} provide an important clue.",
    "Write a newsletter for a club devoted to {topic}.",
    "Write a toast for a celebration of {topic}.",
    "Describe {topic} to someone who has never heard of them.",
    "Discuss the benefits and drawbacks of {topic}.",
    "Write a proposal for a community project involving {topic}.",
    "Write an encyclopedia entry about {topic}.",
    "Write a science fiction story in which {topic} play a central role.",
    "Write a cover letter for a job related to {topic}.",
    "Write a press release announcing a discovery about {topic}.",
    "Write a memoir passage about your first encounter with {topic}.",
    "Write the rules of a game inspired by {topic}.",
    "Write a tourist brochure for a town famous for {topic}.",
    "Write a conversation between a robot and a child about {topic}.",
    "Write a proposal for a national holiday celebrating {topic}.",
    "Write a reflective essay on what {topic} can teach us.",
    "Write a short report for a city council about {topic}.",
    "Write an interview with a scientist who studies {topic}.",
)

TOPICS = (  # plural or mass nouns, so every task template reads grammatically
    "bicycles", "honeybees", "volcanoes", "public libraries", "coffee", "chess", "lighthouses", "moon landings",
    "recycling", "jazz musicians", "rainforests", "sourdough bread", "solar panels", "Roman aqueducts",
    "video games", "vegetable gardens", "deep-sea creatures", "railways", "origami", "penguins",
    "thunderstorms", "city parks", "board games", "string quartets", "printing presses", "coral reefs",
    "mountain climbers", "street food", "household robots", "Olympic athletes", "handwritten letters",
    "glaciers", "public buses", "migrating birds", "film cameras", "mechanical clocks", "heart surgeons",
    "desert plants", "kites", "suspension bridges", "tea ceremonies", "marathon runners", "wolves",
    "electric cars", "museums", "knitting circles", "comets", "rivers", "chocolate makers", "dinosaurs",
    "windmills", "sign languages", "online encyclopedias", "pottery wheels", "lightning rods", "submarines",
    "old maps", "fireflies", "farmers' markets", "astronauts", "snowflakes", "ballet dancers", "octopuses",
    "volunteer firefighters", "second-hand bookstores", "hot air balloons", "spices", "traveling circuses",
    "paper money", "pirates", "the northern lights", "skateboarders", "ocean tides", "wild mushrooms",
    "medieval castles", "typewriters", "night-shift nurses", "sleep habits", "childhood friendships",
    "camping trips",
)


@dataclass(frozen=True)
class ConstraintSpec:
    """One IFEval instruction id, the kwargs variants the generator draws from, and its sentence for kwargs."""

    instruction_id: str
    variants: tuple[dict[str, Any], ...]
    render: Callable[[dict[str, Any]], str]


def _quoted(words: list[str], joiner: str) -> str:
    return f" {joiner} ".join(f'"{w}"' for w in words)


def _times(relation: str, n: int) -> str:
    return f"{'at least' if relation == 'at least' else 'fewer than'} {n} time{'s' if n != 1 else ''}"


_END_PHRASES = ("Is there anything else I can help with?", "Any other questions?", "That is all for now.",
                "Thank you for reading.", "Let me know what you think.", "Have a wonderful day.")
_EXISTENCE = (["harbor", "lantern"], ["orbit", "compass"], ["meadow", "silver"], ["engine", "whisper"],
              ["ladder", "canvas"], ["puzzle", "river"], ["garden", "thunder"], ["mirror", "anchor"],
              ["candle", "village"], ["feather", "signal"], ["bridge", "melody"], ["pocket", "sunrise"])
_FREQUENCY_WORDS = ("light", "time", "future", "water", "people", "home", "story", "world")
_FORBIDDEN = (["very", "really"], ["basically", "actually"], ["thing", "stuff"], ["good", "bad"],
              ["amazing", "awesome"], ["just", "simply"], ["important", "interesting"], ["always", "never"],
              ["great", "nice"], ["literally", "totally"], ["maybe", "perhaps"], ["big", "small"])
_LETTERS = (("z", "at least", 3), ("k", "at least", 5), ("y", "at least", 8), ("b", "at least", 6),
            ("q", "less than", 2), ("j", "less than", 3), ("x", "less than", 2), ("v", "at least", 4))
_FIRST_WORDS = ("today", "however", "finally", "imagine")
_LANGUAGES = {"fr": "French", "es": "Spanish", "de": "German", "it": "Italian", "pt": "Portuguese"}

CONSTRAINTS: tuple[ConstraintSpec, ...] = (
    ConstraintSpec(
        "length_constraints:number_words",
        tuple({"relation": r, "num_words": n} for r, ns in (("at least", (50, 80, 120, 200)),
                                                            ("less than", (40, 60, 100, 150))) for n in ns),
        lambda k: f"Answer with {'at least' if k['relation'] == 'at least' else 'fewer than'} {k['num_words']} words.",
    ),
    ConstraintSpec(
        "length_constraints:number_paragraphs",
        tuple({"num_paragraphs": n} for n in (2, 3, 4)),
        lambda k: f"Write exactly {k['num_paragraphs']} paragraphs, separated from each other by the markdown "
                  "divider ***.",
    ),
    ConstraintSpec(
        "length_constraints:nth_paragraph_first_word",
        tuple({"num_paragraphs": n, "nth_paragraph": i, "first_word": w}
              for n in (2, 3, 4) for i in range(1, n + 1) for w in _FIRST_WORDS),
        lambda k: f"Write exactly {k['num_paragraphs']} paragraphs, separated from each other by one blank line; "
                  f"paragraph {k['nth_paragraph']} must start with the word \"{k['first_word']}\".",
    ),
    ConstraintSpec(
        "detectable_format:number_bullet_lists",
        tuple({"num_bullets": n} for n in (2, 3, 4, 5)),
        lambda k: f"Your answer must contain exactly {k['num_bullets']} bullet points, written as markdown "
                  "bullets such as: * This is a point.",
    ),
    ConstraintSpec(
        "change_case:english_lowercase", ({},),
        lambda k: "Your entire response must be in English and in lowercase letters only; no capital letters "
                  "are allowed.",
    ),
    ConstraintSpec(
        "change_case:english_capital", ({},),
        lambda k: "Your entire response must be in English and in capital letters only.",
    ),
    ConstraintSpec(
        "punctuation:no_comma", ({},),
        lambda k: "Do not use any commas in your response.",
    ),
    ConstraintSpec(
        "keywords:existence",
        tuple({"keywords": list(ws)} for ws in _EXISTENCE),
        lambda k: f"Include the keywords {_quoted(k['keywords'], 'and')} in your response.",
    ),
    ConstraintSpec(
        "keywords:frequency",
        tuple({"keyword": w, "frequency": n, "relation": "at least"} for w in _FREQUENCY_WORDS for n in (2, 3, 4)),
        lambda k: f"Use the word \"{k['keyword']}\" {_times(k['relation'], k['frequency'])}.",
    ),
    ConstraintSpec(
        "keywords:forbidden_words",
        tuple({"forbidden_words": list(ws)} for ws in _FORBIDDEN),
        lambda k: f"Do not use the words {_quoted(k['forbidden_words'], 'or')} anywhere in your response.",
    ),
    ConstraintSpec(
        "keywords:letter_frequency",
        tuple({"letter": c, "let_relation": r, "let_frequency": n} for c, r, n in _LETTERS),
        lambda k: f"The letter \"{k['letter']}\" must appear {_times(k['let_relation'], k['let_frequency'])} "
                  "in your response.",
    ),
    ConstraintSpec(
        "detectable_content:postscript",
        tuple({"postscript_marker": m} for m in ("P.S.", "P.P.S")),
        lambda k: f"At the end of your response, add a postscript starting with {k['postscript_marker']}"
                  + ("" if k["postscript_marker"].endswith(".") else "."),
    ),
    ConstraintSpec(
        "detectable_content:number_placeholders",
        tuple({"num_placeholders": n} for n in (1, 2, 3)),
        lambda k: f"Include at least {k['num_placeholders']} placeholder{'s' if k['num_placeholders'] > 1 else ''}"
                  " in square brackets, such as [name].",
    ),
    ConstraintSpec(
        "detectable_format:number_highlighted_sections",
        tuple({"num_highlights": n} for n in (1, 2, 3)),
        lambda k: f"Highlight at least {k['num_highlights']} section{'s' if k['num_highlights'] > 1 else ''} of "
                  "your answer with markdown, i.e. *highlighted section*.",
    ),
    ConstraintSpec(
        "detectable_format:multiple_sections",
        tuple({"section_spliter": s, "num_sections": n} for s in ("Section", "SECTION") for n in (2, 3, 4)),
        lambda k: f"Your response must have {k['num_sections']} sections; mark the beginning of each section "
                  f"with {k['section_spliter']} X, such as: {k['section_spliter']} 1.",
    ),
    ConstraintSpec(
        "detectable_format:title", ({},),
        lambda k: "Give your answer a title wrapped in double angular brackets, such as <<a day at sea>>.",
    ),
    ConstraintSpec(
        "detectable_format:json_format", ({},),
        lambda k: "Wrap your entire output in JSON format; you may use markdown ticks such as ```.",
    ),
    ConstraintSpec(
        "startend:end_checker",
        tuple({"end_phrase": p} for p in _END_PHRASES),
        lambda k: f"Finish your response with this exact phrase: {k['end_phrase']} No other words should "
                  "follow it.",
    ),
    ConstraintSpec(
        "startend:quotation", ({},),
        lambda k: "Wrap your entire response in double quotation marks.",
    ),
    ConstraintSpec(
        "combination:two_responses", ({},),
        lambda k: "Give two different responses, separated by 6 asterisk symbols: ******.",
    ),
    ConstraintSpec(
        "language:response_language",
        tuple({"language": code} for code in _LANGUAGES),
        lambda k: f"Your entire response must be in {_LANGUAGES[k['language']]}; no other language is allowed.",
    ),
)

_IDS = frozenset(spec.instruction_id for spec in CONSTRAINTS)

# IFEval's INSTRUCTION_CONFLICTS restricted to CONSTRAINTS, pinned here so that the prompt space cannot move when
# if-verifiable changes; tests/test_prompts.py checks that it equals the installed registry's.
IFEVAL_CONFLICTS: dict[str, frozenset[str]] = {
    "length_constraints:number_paragraphs": frozenset({"length_constraints:nth_paragraph_first_word"}),
    "change_case:english_lowercase": frozenset({"change_case:english_capital", "language:response_language"}),
    "change_case:english_capital": frozenset({"language:response_language"}),
    "detectable_format:multiple_sections": frozenset({"detectable_format:number_highlighted_sections",
                                                      "language:response_language"}),
    "detectable_format:title": frozenset({"startend:quotation"}),
    "language:response_language": frozenset({"keywords:existence", "keywords:forbidden_words", "keywords:frequency",
                                             "startend:end_checker"}),
    "detectable_format:json_format": _IDS - {"keywords:forbidden_words", "keywords:existence"},
    "combination:two_responses": _IDS - {"keywords:forbidden_words", "keywords:existence", "punctuation:no_comma",
                                         "language:response_language", "detectable_format:title"},
}

# Pairs that contradict each other in the texts above, on top of IFEval's conflicts.
EXTRA_CONFLICTS = (
    ("change_case:english_lowercase", "detectable_format:multiple_sections"),  # "Section 1" has a capital
    ("change_case:english_lowercase", "detectable_content:postscript"),  # "P.S." is asked for in capitals
    ("change_case:english_lowercase", "startend:end_checker"),  # the end phrases start with a capital
    ("change_case:english_capital", "detectable_format:multiple_sections"),
    ("change_case:english_capital", "startend:end_checker"),
    ("length_constraints:nth_paragraph_first_word", "detectable_format:title"),  # a title line is a paragraph
    ("length_constraints:nth_paragraph_first_word", "detectable_content:postscript"),
    ("length_constraints:nth_paragraph_first_word", "detectable_format:multiple_sections"),
    ("startend:end_checker", "detectable_content:postscript"),  # both ask for the last words
    ("language:response_language", "length_constraints:nth_paragraph_first_word"),  # the first word is English
)

CONFLICTS: frozenset[frozenset[str]] = frozenset(  # unordered pairs that never share a prompt
    [frozenset((a, b)) for a, bs in IFEVAL_CONFLICTS.items() for b in bs if a != b]
    + [frozenset(pair) for pair in EXTRA_CONFLICTS]
)
