"""MedMCQA (openlifescienceai/medmcqa), the paper's medical training data: a question, four options `opa`..`opd`,
the index of the correct one `cop` (0-3) and an explanation `exp` (often missing; optional).

As in the paper, each row becomes an instruction (the question and its lettered options) and a response (the
explanation, when there is one) ending "So the answer to this question is X", X being the letter of the correct
option. The Hub's `test` split has no answers (`cop` = -1): every row of it is unusable, use `validation` instead.
"""

from __future__ import annotations

from .formatting import DatasetFormat, UnusableRow, required_text

OPTION_COLUMNS = ("opa", "opb", "opc", "opd")
LETTERS = "ABCD"
ANSWER_SENTENCE = "So the answer to this question is {letter}."


def answer_index(value) -> int:
    """`cop` as 0-3: an integer (the Hub's class label) or a letter a-d / A-D (a local file may store letters)."""
    if value is None:
        raise UnusableRow("missing cop")
    if isinstance(value, str):
        text = value.strip()
        if len(text) == 1 and text.upper() in LETTERS:
            return LETTERS.index(text.upper())
        if text.lstrip("-").isdigit():
            value = int(text)
        else:
            raise UnusableRow("cop is not an answer index")
    if isinstance(value, float) and value.is_integer():  # csv/pandas store integer columns with gaps as floats
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnusableRow("cop is not an answer index")
    index = value
    if not 0 <= index < len(OPTION_COLUMNS):
        raise UnusableRow("cop out of range 0-3")
    return index


def explanation(row: dict) -> str | None:
    value = row.get("exp")
    return value.strip() if isinstance(value, str) and value.strip() else None


def to_instruction_response(row: dict) -> tuple[str, str]:
    question = required_text(row, "question")
    options = [required_text(row, column) for column in OPTION_COLUMNS]
    letter = LETTERS[answer_index(row.get("cop"))]
    instruction = question + "\n" + "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    answer = ANSWER_SENTENCE.format(letter=letter)
    exp = explanation(row)
    return instruction, (f"{exp}\n{answer}" if exp else answer)


def note(row: dict) -> str | None:
    return None if explanation(row) else "no explanation (answer sentence only)"


FORMAT = DatasetFormat(
    name="medmcqa",
    hub_id="openlifescienceai/medmcqa",
    required_columns=("question", *OPTION_COLUMNS, "cop"),  # `exp` is optional
    to_instruction_response=to_instruction_response,
    description="question + options A-D -> explanation + 'So the answer to this question is X.'",
    note=note,
)
