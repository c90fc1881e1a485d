"""Prompt sets: the real benchmark files in ../shared/data/prompts, the built-ins, and clear errors for bad input."""

from __future__ import annotations

import csv
import json

import pytest

from gflowdiff.training.prompts import ANIMALS, BUILTIN_PROMPT_SETS, load_prompts
from gflowdiff.zoo.digits import GENERIC_PROMPT

OPTION = "--data.train_prompts"


# ---- the real files -------------------------------------------------------------------------------------------------
def test_drawbench_csv(shared_data):
    path = shared_data / "prompts" / "drawbench.csv"
    prompts = load_prompts(str(path))
    # DrawBench: 200 prompts in the column "Prompts" (matched case-insensitively to "prompts")
    assert len(prompts) == 200
    with path.open(encoding="utf-8-sig", newline="") as handle:
        expected = [row["Prompts"].strip() for row in csv.DictReader(handle)]
    assert prompts == expected
    assert prompts[0] == "A red colored car."


def test_hpdv2_photo_json(shared_data):
    path = shared_data / "prompts" / "hpdv2" / "benchmark_photo.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    prompts = load_prompts(str(path))
    # a JSON list of strings; surrounding whitespace is stripped (115 of the 800 entries carry some)
    assert len(prompts) == len(data) == 800
    assert prompts == [p.strip() for p in data]


def test_simple_animals_txt(shared_data):
    prompts = load_prompts(str(shared_data / "prompts" / "simple_animals.txt"))
    # one animal per line, 45 lines
    assert len(prompts) == 45
    assert prompts[:3] == ["cat", "dog", "horse"]


# ---- built-in sets --------------------------------------------------------------------------------------------------
def test_builtin_sets():
    assert load_prompts("digits") == [GENERIC_PROMPT]
    # one class-conditional prompt per digit 0..9: "<generic> k"
    assert load_prompts("digits:classes") == [f"{GENERIC_PROMPT} {k}" for k in range(10)]
    animals = load_prompts("animals")
    # the paper's simple-animals setting uses 45 names (docs/method.md §4.3); ours are distinct
    assert len(animals) == 45 and len(set(animals)) == 45
    assert animals == ANIMALS


def test_builtin_sets_are_copies():
    prompts = load_prompts("animals")
    prompts.append("dragon")
    # mutating the returned list must not change the built-in set
    assert len(BUILTIN_PROMPT_SETS["animals"]) == 45


# ---- user files -----------------------------------------------------------------------------------------------------
def test_jsonl_strings_and_objects(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps("a cat"), "", json.dumps({"prompt": "  a dog  ", "seed": 3}), "   ", json.dumps("a fox")]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # blank lines skipped; strings and {"prompt": ...} objects both accepted; whitespace stripped
    assert load_prompts(str(path)) == ["a cat", "a dog", "a fox"]


def test_json_list_of_objects(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "a cat"}, "a dog"]), encoding="utf-8")
    assert load_prompts(str(path)) == ["a cat", "a dog"]


def test_txt_drops_blank_lines_and_whitespace(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n   \n  a dog \r\na fox\n\n", encoding="utf-8")
    # 7 lines, 3 non-blank (CRLF handled by splitlines)
    assert load_prompts(str(path)) == ["a cat", "a dog", "a fox"]


def test_csv_with_bom_and_blank_rows(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_bytes("\ufeffCaption,Category\na cat,x\n,y\n a dog ,z\n".encode())
    # the UTF-8 BOM is not part of the header "Caption"; the empty row is dropped
    assert load_prompts(str(path)) == ["a cat", "a dog"]


# ---- errors name the option -----------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=OPTION) as error:
        load_prompts(str(tmp_path / "nope.txt"))
    # the message lists the built-in names, so a typo in a set name is obvious
    assert "animals" in str(error.value)


def test_custom_option_name_in_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data.eval_prompts"):
        load_prompts(str(tmp_path / "nope.txt"), "--data.eval_prompts")


def test_bad_utf8(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a cat\n\xff\xfe bad bytes\n")
    with pytest.raises(ValueError, match=f"{OPTION}.*not valid UTF-8"):
        load_prompts(str(path))


@pytest.mark.parametrize("content", ["", "\n\n   \n\t\n"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_empty_or_blank_file(tmp_path, content, suffix):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=f"{OPTION}.*holds no prompts"):
        load_prompts(str(path))


def test_json_list_of_blank_strings(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["", "  "]), encoding="utf-8")
    with pytest.raises(ValueError, match=f"{OPTION}.*holds no prompts"):
        load_prompts(str(path))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text("- a cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{OPTION}.*unsupported prompt file type '.yaml'"):
        load_prompts(str(path))


def test_invalid_json(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('["a cat", ', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{OPTION}.*not valid JSON"):
        load_prompts(str(path))


def test_invalid_jsonl_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('"a cat"\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{OPTION}.*not valid JSON"):
        load_prompts(str(path))
    with pytest.raises(ValueError, match="line 2"):  # the 1-based line of the bad entry
        load_prompts(str(path))


def test_json_not_a_list(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"prompt": "a cat"}), encoding="utf-8")
    with pytest.raises(ValueError, match=f"{OPTION}.*JSON list"):
        load_prompts(str(path))


@pytest.mark.parametrize("entry", [3, {"text": "a cat"}, {"prompt": 7}, None])
def test_json_bad_entry(tmp_path, entry):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["a dog", entry]), encoding="utf-8")
    with pytest.raises(ValueError, match=f"{OPTION}.*'prompt' string"):
        load_prompts(str(path))


def test_csv_without_prompt_column(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("description,category\na cat,animals\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{OPTION}.*no prompt column"):
        load_prompts(str(path))
