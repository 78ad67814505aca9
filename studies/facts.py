"""A generated knowledge task: facts about fictional people, asked in several phrasings (`studies.knowledge`).

Why this task: the word-order task of `asft_trl.quickstart.task` is a rule the model learns as a format; the paper's
claim about DFT (its weights concentrate on tokens that are already likely and leave the unlikely ones unlearned) needs
targets that stay unlikely for the model: knowledge. Every person, town and pet here is invented from syllables, so
SmolLM2-135M-Instruct cannot already answer (its recall is measured, not assumed), and the answers hold many tokens the
base model finds unlikely (invented names split into rare sub-words, the digits of a year) beside many it finds likely
(the repeated subject name, "was born in", the full stop, the end of turn).

Each person has four facts (`ATTRIBUTES`): birthplace (an invented town), birth year, pet's name (invented) and
occupation (a real word). Each attribute has five question phrasings; the first `N_TRAIN_PHRASINGS` are used for
training, the others only for testing. The splits:

- `train`: every fact of the training people, in each training phrasing;
- `test_phrasings`: the same facts, in the held-out phrasings (recall of trained knowledge asked differently);
- `test_facts`: the facts of other people, never trained on, in the held-out phrasings (a control: nothing there can be
  recalled, so its score is the guessing rate, e.g. the commonest occupation).

Values are drawn with replacement from fixed pools shared by all people, so a model that answers an unseen person with
a trained town gets the pool's chance rate, not zero. Answers are one sentence restating the subject ("Brivanto
Quellmar was born in Oskaveth."); a reply is correct when it contains the value (`score(..., match="contains")` on
`as_recall_rows`). The same seed always gives the same splits; nothing is downloaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset, DatasetDict

N_TRAIN_PHRASINGS = 3  # per attribute: the first 3 phrasings are trained on, the last 2 are held out
_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "qu",
    "r",
    "s",
    "sk",
    "t",
    "th",
    "v",
    "z",
    "zh",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "th", "sk", "m", "x")
_TOWN_ENDINGS = ("heim", "ora", "vale", "mir", "dun", "eth", "wick", "ost")
OCCUPATIONS = (
    "baker",
    "carpenter",
    "pilot",
    "tailor",
    "painter",
    "farmer",
    "sailor",
    "dentist",
    "potter",
    "librarian",
    "jeweler",
    "locksmith",
    "beekeeper",
    "blacksmith",
    "cartographer",
    "glassblower",
)
N_TOWNS, N_PETS, YEARS = 24, 24, (1700, 1999)


@dataclass(frozen=True)
class Attribute:
    name: str
    questions: tuple[str, ...]  # "{name}" is the person; the first N_TRAIN_PHRASINGS are trained on
    answer: str  # "{name}" and "{value}"


ATTRIBUTES = (
    Attribute(
        "birthplace",
        (
            "Where was {name} born?",
            "In which town was {name} born?",
            "What is the birthplace of {name}?",
            "{name} was born in which town?",
            "Tell me the town where {name} was born.",
        ),
        "{name} was born in {value}.",
    ),
    Attribute(
        "birth_year",
        (
            "In what year was {name} born?",
            "When was {name} born?",
            "What is the birth year of {name}?",
            "{name} was born in which year?",
            "Tell me the year {name} was born.",
        ),
        "{name} was born in the year {value}.",
    ),
    Attribute(
        "pet",
        (
            "What is the name of {name}'s pet?",
            "What is {name}'s pet called?",
            "What did {name} name their pet?",
            "{name} has a pet; what is its name?",
            "Tell me what {name}'s pet is called.",
        ),
        "{name}'s pet is called {value}.",
    ),
    Attribute(
        "occupation",
        (
            "What does {name} do for a living?",
            "What is {name}'s job?",
            "What is the occupation of {name}?",
            "{name} works as what?",
            "Tell me what job {name} has.",
        ),
        "{name} works as a {value}.",
    ),
)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _distinct(rng: random.Random, n: int, make, taken: set[str]) -> list[str]:
    """`n` new capitalised words from `make(rng)`, none in `taken` (which is updated), in the order drawn."""
    out = []
    while len(out) < n:
        word = make(rng).capitalize()
        if word.lower() not in taken:
            taken.add(word.lower())
            out.append(word)
    return out


def make_people(n_people: int, seed: int = 0) -> list[dict]:
    """`n_people` invented people, each `{"name": ..., "birthplace": ..., "birth_year": ..., "pet": ...,
    "occupation": ...}`; the same seed always gives the same people. Names, towns and pets are all distinct words."""
    rng = random.Random(seed)
    taken: set[str] = set()
    towns = _distinct(rng, N_TOWNS, lambda r: _word(r, r.randint(1, 2)) + r.choice(_TOWN_ENDINGS), taken)
    pets = _distinct(rng, N_PETS, lambda r: _word(r, 2), taken)
    firsts = _distinct(rng, n_people, lambda r: _word(r, 2), taken)
    lasts = _distinct(rng, n_people, lambda r: _word(r, r.randint(2, 3)), taken)
    return [
        {
            "name": f"{first} {last}",
            "birthplace": rng.choice(towns),
            "birth_year": str(rng.randint(*YEARS)),
            "pet": rng.choice(pets),
            "occupation": rng.choice(OCCUPATIONS),
        }
        for first, last in zip(firsts, lasts)
    ]


def _rows(person: dict, phrasings: range) -> list[dict]:
    rows = []
    for attribute in ATTRIBUTES:
        value = person[attribute.name]
        for i in phrasings:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": attribute.questions[i].format(name=person["name"])}],
                    "completion": [
                        {"role": "assistant", "content": attribute.answer.format(name=person["name"], value=value)}
                    ],
                    "person": person["name"],
                    "attribute": attribute.name,
                    "value": value,
                    "phrasing": i,
                }
            )
    return rows


def make_fact_splits(n_people: int = 16, n_heldout_people: int = 4, seed: int = 0) -> DatasetDict:
    """`train`, `test_phrasings` and `test_facts` (see the module docstring), in TRL's conversational
    prompt/completion form plus the columns `person`, `attribute`, `value` and `phrasing` (the question's index).

    `train` is shuffled with the same seed; the test splits keep their order (person, attribute, phrasing). Pass only
    the `prompt` and `completion` columns to a trainer.
    """
    if n_people <= 0 or n_heldout_people < 0:
        raise ValueError(f"n_people={n_people} must be > 0 and n_heldout_people={n_heldout_people} >= 0.")
    people = make_people(n_people + n_heldout_people, seed)
    trained, heldout = people[:n_people], people[n_people:]
    n_phrasings = len(ATTRIBUTES[0].questions)
    train = [row for person in trained for row in _rows(person, range(N_TRAIN_PHRASINGS))]
    random.Random(seed).shuffle(train)
    test_phrasings = [row for person in trained for row in _rows(person, range(N_TRAIN_PHRASINGS, n_phrasings))]
    test_facts = [row for person in heldout for row in _rows(person, range(N_TRAIN_PHRASINGS, n_phrasings))]
    columns = ["prompt", "completion", "person", "attribute", "value", "phrasing"]
    return DatasetDict(
        {
            name: Dataset.from_list(rows) if rows else Dataset.from_dict({c: [] for c in columns})
            for name, rows in (("train", train), ("test_phrasings", test_phrasings), ("test_facts", test_facts))
        }
    )


def as_recall_rows(dataset: Dataset) -> Dataset:
    """The same questions with the fact's value as the gold completion, for `score(..., match="contains")`: a reply
    counts as correct when it contains the value, whatever sentence is around it."""
    return Dataset.from_list(
        [{"prompt": row["prompt"], "completion": [{"role": "assistant", "content": row["value"]}]} for row in dataset]
    )


def spread_subset(dataset: Dataset, n: int) -> Dataset:
    """`n` rows spread evenly over `dataset` (all of it when `n` is 0 or not smaller), so a subset of a split ordered
    by person and attribute still covers every attribute and phrasing."""
    if n <= 0 or n >= len(dataset):
        return dataset
    return dataset.select([int(i * len(dataset) / n) for i in range(n)])
