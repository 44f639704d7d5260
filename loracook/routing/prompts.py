"""Prompt files: JSONL with one ``{"prompt": "..."}`` object per line (route exemplars, `generate --file`,
`route --file`). Other keys on a line (a training file's ``completion``) are ignored; blank lines are skipped.

Every problem is one :class:`~loracook.errors.BadInput` naming the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path

from loracook.errors import BadInput

MAX_BYTES = 256 * 2**20  # a prompt file larger than this is not what the user meant


def read_prompts(path: str | Path, *, what: str = "prompt file", fix: str | None = None) -> list[str]:
    """The prompts of a JSONL file, in order.

    >>> read_prompts("missing.jsonl")  # doctest: +SKIP
    BadInput: missing.jsonl: prompt file not found
    """
    file = Path(path)
    if not file.exists():
        raise BadInput(f"{what} not found", file=file, fix=fix or "check the path")
    if not file.is_file():
        raise BadInput(
            f"{what} is not a regular file", file=file, fix='give a JSONL file of {"prompt": ...} lines'
        )
    try:
        with open(file, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise BadInput(f"cannot read the {what}: {exc.strerror or exc}", file=file) from None
    if len(raw) > MAX_BYTES:
        raise BadInput(
            f"the {what} is larger than {MAX_BYTES:,} bytes", file=file, fix="is this the right file?"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"the {what} is not UTF-8 text (byte {exc.start})", file=file) from None
    prompts: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        prompts.append(_prompt(line, number, file, what))
    if not prompts:
        raise BadInput(f"the {what} is empty", file=file, fix='add {"prompt": ...} lines (JSONL)')
    return prompts


def _prompt(line: str, number: int, file: Path, what: str) -> str:
    def bad(problem: str) -> BadInput:
        error = BadInput(
            f"{what}: {problem}", file=file, fix='each line must be a JSON object {"prompt": "..."}'
        )
        error.line = number
        return error

    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise bad(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise bad(f"a JSON {type(value).__name__}, not an object")
    if "prompt" not in value:
        raise bad(f'no "prompt" key (keys: {", ".join(sorted(value)) or "none"})')
    prompt = value["prompt"]
    if not isinstance(prompt, str):
        raise bad(f'"prompt" is a JSON {type(prompt).__name__}, not a string')
    if not prompt.strip():
        raise bad("the prompt is empty")
    return prompt
