"""Prompt sets: built-in lists and user files (txt, csv, json, jsonl), loaded with clear errors for bad input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from gflowdiff.zoo.digits import GENERIC_PROMPT, digit_prompt

# Our own list for the paper's "simple animals" setting (docs/method.md §4.3 uses 45 animal names).
ANIMALS = [
    "cat", "dog", "horse", "cow", "sheep", "pig", "goat", "rabbit", "mouse", "hamster", "fox", "wolf", "bear",
    "panda", "koala", "kangaroo", "lion", "tiger", "leopard", "cheetah", "zebra", "giraffe", "elephant", "rhino",
    "hippo", "camel", "deer", "moose", "squirrel", "raccoon", "otter", "beaver", "hedgehog", "owl", "eagle",
    "parrot", "penguin", "flamingo", "swan", "duck", "frog", "turtle", "snake", "dolphin", "whale",
]  # fmt: skip

BUILTIN_PROMPT_SETS = {
    "digits": [GENERIC_PROMPT],
    "digits:classes": [digit_prompt(k) for k in range(10)],
    "animals": ANIMALS,
}
CSV_COLUMNS = ("prompt", "prompts", "text", "caption")


def load_prompts(source: str, option: str = "--data.train_prompts") -> list[str]:
    """A built-in set name (``digits``, ``digits:classes``, ``animals``) or a file path.

    Files: ``.txt`` (one prompt per line), ``.csv`` (a column named prompt/prompts/text/caption, e.g. DrawBench's
    ``Prompts``), ``.json`` (a list of strings, or of objects with a ``prompt`` key), ``.jsonl`` (one string or
    object per line). Blank lines and surrounding whitespace are dropped; an empty result is an error.
    """
    if source in BUILTIN_PROMPT_SETS:
        return list(BUILTIN_PROMPT_SETS[source])
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{option}: {source!r} is neither a built-in prompt set ({', '.join(BUILTIN_PROMPT_SETS)}) nor a file"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{option}: {str(path)!r} is not valid UTF-8 ({error})") from error
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = text.splitlines()
    elif suffix == ".csv":
        prompts = _csv_prompts(text, path, option)
    elif suffix == ".json":
        prompts = [_prompt_of(item, path, option) for item in _parse_json(text, path, option)]
    elif suffix == ".jsonl":
        prompts = [_prompt_of(item, path, option) for item in _parse_jsonl(text, path, option)]
    else:
        raise ValueError(f"{option}: unsupported prompt file type {suffix!r} (use .txt, .csv, .json or .jsonl)")
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"{option}: {str(path)!r} holds no prompts")
    return prompts


def _parse_json(text: str, path: Path, option: str) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{option}: {str(path)!r} is not valid JSON ({error})") from error
    if not isinstance(data, list):
        raise ValueError(f"{option}: {str(path)!r} must hold a JSON list of prompts")
    return data


def _parse_jsonl(text: str, path: Path, option: str) -> list:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{option}: {str(path)!r} line {number} is not valid JSON ({error})") from error
    return items


def _prompt_of(item: object, path: Path, option: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        return item["prompt"]
    raise ValueError(f"{option}: {str(path)!r}: each entry must be a string or an object with a 'prompt' string")


def _csv_prompts(text: str, path: Path, option: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text))
    columns = {name.strip().lower(): name for name in reader.fieldnames or []}
    column = next((columns[c] for c in CSV_COLUMNS if c in columns), None)
    if column is None:
        raise ValueError(f"{option}: {str(path)!r} has no prompt column (one of {', '.join(CSV_COLUMNS)})")
    return [row[column] or "" for row in reader]
