"""Built-in long documents for the demo job and long-context checks.

`harbor_report()` is a generated report about a fictional harbour town (a few thousand tokens)
with facts a reader can be asked about; `passkey_haystack()` is the classic pass-key retrieval
prompt (a number hidden in repeated filler text).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


@dataclass(frozen=True)
class Document:
    text: str
    questions: list[str]
    answers: list[str]
    """Substrings a correct answer contains, one per question."""


_DEPARTMENTS = [
    ("harbour office", "counted {n} fishing boats moored at the north quay"),
    ("library", "lent {n} books, most of them about sailing and weather"),
    ("bakery guild", "baked {n} loaves of rye bread for the winter market"),
    ("school", "taught {n} children to read, swim and mend nets"),
    ("lighthouse crew", "logged {n} nights of heavy fog on the western cliffs"),
    ("fire brigade", "answered {n} calls, most of them chimney fires"),
    ("weather station", "measured {n} millimetres of rain over the year"),
    ("ferry company", "carried {n} passengers between the town and the mainland"),
]
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def harbor_report(seed: int = 7, num_sections: int = 24) -> Document:
    """A deterministic report of about 150 tokens per section, plus its key facts."""
    rng = random.Random(seed)
    keeper, mayor, boat = "Ingrid Solberg", "Tomas Berg", "the Silver Gull"
    parts = [
        "# Annual report of the harbour town of Kelmsby\n",
        f"Kelmsby is a small fishing town on a rocky coast. Its mayor is {mayor}, who was "
        "elected for a third term this spring. The town is proud of its old stone lighthouse. "
        f"The keeper of the lighthouse is {keeper}, who has kept it for twenty years.\n",
    ]
    for i in range(num_sections):
        name, fact = _DEPARTMENTS[i % len(_DEPARTMENTS)]
        month = _MONTHS[i % 12]
        n = rng.randint(12, 980)
        parts.append(
            f"\n## {month}: the {name}\n"
            f"In {month} the {name} {fact.format(n=n)}. The council thanked the volunteers "
            "who helped, and noted that the work was finished on time and within the budget. "
            "Residents were reminded that the town hall is open every weekday morning, that "
            "the market square is cleared on Sundays, and that visitors should park outside "
            "the old walls. "
        )
        if i == num_sections // 2:
            parts.append(
                f"This month the largest boat of the fleet, {boat}, returned from a "
                "record voyage with a hold full of herring. "
            )
    parts.append("\nThe report ends with the council's thanks to every resident of Kelmsby.\n")
    return Document(
        text="".join(parts),
        questions=[
            # "Who keeps the lighthouse" (the verb, not the report's noun "keeper") made the
            # demo model answer with the report's last sentence: ask with the report's words.
            "Who is the keeper of the lighthouse of Kelmsby?",
            "Who is the mayor of Kelmsby?",
            "What is the name of the largest boat of the fleet?",
        ],
        answers=["Ingrid Solberg", "Tomas Berg", "Silver Gull"],
    )


def passkey_haystack(pass_key: int, num_filler: int = 60, position: float = 0.5) -> str:
    """The pass-key prompt: filler text with `The pass key is N.` at a relative position."""
    before = int(num_filler * position)
    return (
        "There is important information hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about it.\n"
        + FILLER * before
        + f"The pass key is {pass_key}. Remember it. {pass_key} is the pass key. "
        + FILLER * (num_filler - before)
        + "\nWhat is the pass key?"
    )
