"""Prompt text for each suite and template. Pure string functions: no tokenizer, no model.

Templates:
- `chat`: the model's own chat template (applied in generation.py) around a user turn with an instruction.
- `alpaca`: the Alpaca "prompt_no_input" format the ASFT authors trained with (instruction, then "### Response:"),
  the very template the recipes train on (`asft_trl.data.formatting`), so a model is scored on the prompt it learned.
- `raw`: the text as is (base models; HumanEval-style code completion; the medical suite's zero-shot prompt).
"""

from __future__ import annotations

import string

from ..data.formatting import ALPACA_PROMPT_NO_INPUT

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_COMPLETE_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function in a ```python code block.\n\n"
    "```python\n{prompt}```"
)
CODE_WRITE_INSTRUCTION = (
    "Write a Python function for the task below. Reply with the function in a ```python code block.\n\n{prompt}"
)


def medical_prompt(question: str, options: list[str]) -> str:
    """The paper's zero-shot multiple-choice prompt; the model's next token after "Answer:" is read as its choice."""
    lines = "\n".join(f"{letter}. {option}" for letter, option in zip(string.ascii_uppercase, options))
    return f"Question: {question}\n\nOptions:\n{lines}\n\nAnswer:"


def _wrap(instruction: str, template: str) -> str | list[dict]:
    """A chat turn (list of messages) for `chat`, a string otherwise."""
    if template == "chat":
        return [{"role": "user", "content": instruction}]
    if template == "alpaca":
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return instruction


def math_prompt(question: str, template: str) -> str | list[dict]:
    if template == "raw":
        return question
    return _wrap(f"{question}\n{MATH_INSTRUCTION}", template)


def code_prompt(item: dict, template: str) -> str | list[dict]:
    """HumanEval-style items (`mode="complete"`) continue the given signature under `raw`; the other templates ask
    for the whole function in a code block."""
    if template == "raw":
        return item["prompt"]
    instruction = CODE_COMPLETE_INSTRUCTION if item["mode"] == "complete" else CODE_WRITE_INSTRUCTION
    return _wrap(instruction.format(prompt=item["prompt"]), template)


def quickstart_prompt(prompt, template: str) -> str | list[dict]:
    """Quickstart rows are chat turns already; plain-text prompts are wrapped like any instruction."""
    if isinstance(prompt, list):
        if template == "chat":
            return prompt
        prompt = prompt[-1]["content"]
    return _wrap(prompt, template)
