import json

import pytest
from hypothesis import given, strategies as st

from spmd_diff.errors import UserError
from spmd_diff.io.inputs import load_prompts, parse_prompts, parse_shard, shard_items, text_item_id


def test_jsonl_items_and_default_seeds():
    text = "\n".join([json.dumps({"id": "a", "prompt": "x"}), json.dumps({"id": "b", "prompt": "y", "seed": 9,
                                                                          "negative_prompt": "n"})]) + "\n\n"
    items = parse_prompts(text, "p.jsonl", base_seed=100)
    assert [(i.index, i.id, i.seed, i.negative_prompt) for i in items] == [(0, "a", 100, None), (1, "b", 9, "n")]


def test_plain_text_ids_and_seeds_come_from_the_text_not_the_line_number():
    before = parse_prompts("a cat\na dog\n", "p.txt", base_seed=5)
    after = parse_prompts("a NEW first line\na cat\na dog\n", "p.txt", base_seed=5)
    assert [(i.id, i.seed) for i in after[1:]] == [(i.id, i.seed) for i in before], "inserting a line shifts nothing"
    assert [i.prompt for i in after] == ["a NEW first line", "a cat", "a dog"]
    assert len({i.id for i in after}) == 3 and all(len(i.id) == 16 for i in after)
    assert before[0].id == text_item_id("a cat", 1)
    other_seed = parse_prompts("a cat\n", "p.txt", base_seed=6)
    assert other_seed[0].id == before[0].id and other_seed[0].seed == before[0].seed + 1


def test_repeated_plain_text_lines_are_distinct_items():
    items = parse_prompts("a cat\na dog\na cat\n a cat \n", "p.txt", base_seed=0)
    cat = text_item_id("a cat", 1)
    assert [i.id for i in items] == [cat, text_item_id("a dog", 1), f"{cat}.2", f"{cat}.3"]
    assert len({i.seed for i in items}) == 4


def test_byte_order_marks(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "prompt": "x"}).encode() + b"\n")
    assert [i.id for i in load_prompts(path, 0)] == ["a"]
    path.write_bytes('{"id": "a", "prompt": "x"}\n'.encode("utf-16"))
    with pytest.raises(UserError, match="is UTF-16 .* save it as UTF-8"):
        load_prompts(path, 0)
    path.write_bytes(b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "\xff"}\n')
    with pytest.raises(UserError, match=r"is not UTF-8 text \(line 2"):
        load_prompts(path, 0)


@pytest.mark.parametrize("line,message", [
    (r'{"id": "a", "prompt": "sunset \ud83c"}', r"p.jsonl:2: prompt contains a lone UTF-16 surrogate (\ud83c)"),
    (r'{"id": "a", "prompt": "x\u0000y"}', r"p.jsonl:2: prompt contains a NUL character (\u0000) at character 2"),
    (r'{"id": "a\ud83c", "prompt": "x"}', "p.jsonl:2: id contains a lone UTF-16 surrogate"),
    (r'{"id": "a\u0000", "prompt": "x"}', "p.jsonl:2: id contains a NUL character"),
    (r'{"id": "a", "prompt": "x", "negative_prompt": "\udf05"}', "p.jsonl:2: negative_prompt contains a lone"),
    ('{"id": "a", "prompt": "x", "id": "b"}', "p.jsonl:2: key 'id' appears twice in one object"),
])
def test_text_hdf5_cannot_store_is_refused_with_file_and_line(line, message):
    with pytest.raises(UserError) as err:
        parse_prompts('{"id": "ok", "prompt": "fine \\ud83c\\udf05"}\n' + line + "\n", "p.jsonl", 0)
    assert message in str(err.value)
    str(err.value).encode("utf-8")  # the message itself can be printed


def test_a_surrogate_pair_is_one_character_and_fine():
    [item] = parse_prompts(r'{"id": "sun", "prompt": "sunset \ud83c\udf05"}', "p.jsonl", 0)
    assert item.prompt == "sunset \U0001f305"


def test_nul_in_plain_text_is_refused():
    with pytest.raises(UserError, match=r"p.txt:2: the prompt contains a NUL character"):
        parse_prompts("fine\nnot\x00fine\n", "p.txt", 0)


@pytest.mark.parametrize("text,message", [
    ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}', "p:2: duplicate id 'a' (first on line 1)"),
    ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": ', "p:2: not valid JSON"),
    ('{"id": "a", "prompt": ""}', "p:1: prompt must be a non-empty string"),
    ('{"id": "a/b", "prompt": "x"}', "may not contain '/'"),
    ('{"id": 3, "prompt": "x"}', "id must be a string"),
    ('{"id": "a", "prompt": "x", "seed": -1}', "seed must be in"),
    ('{"id": "a", "prompt": "x", "seed": 1.5}', "seed must be an integer"),
    ('{"id": "a", "promt": "x"}', "unknown key 'promt' (did you mean 'prompt'?)"),
    ('{"id": "a", "prompt": "x"}\n\n{"id": "b", "prompt": "y"}', "p:2: empty line"),
    ('{"id": "a", "prompt": "x"}\n[1, 2]', "p:2: expected a JSON object"),
    ("", "no prompts"),
])
def test_malformed_prompts_name_the_line(text, message):
    with pytest.raises(UserError) as err:
        parse_prompts(text, "p", 0)
    assert message in str(err.value)


def test_shards_partition_items():
    items = parse_prompts("\n".join(f"p{i}" for i in range(10)), "p", 0)
    parts = [shard_items(items, (i, 3)) for i in range(3)]
    assert sorted(it.index for part in parts for it in part) == list(range(10))
    assert parse_shard("1/3") == (1, 3)
    with pytest.raises(UserError):
        parse_shard("3/3")


@given(st.lists(st.text(min_size=1).filter(lambda s: s.strip() and "\n" not in s and "\r" not in s
                                            and not s.lstrip().startswith("{") and s == s.strip()
                                            and all(c not in s for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00")),
                min_size=1, max_size=20))
def test_plain_text_round_trip(prompts):
    items = parse_prompts("\n".join(prompts), "p", 0)
    assert [i.prompt for i in items] == prompts


@given(st.lists(st.fixed_dictionaries({"id": st.text(min_size=1, max_size=20), "prompt": st.text(min_size=1)}),
                min_size=1, max_size=10))
def test_jsonl_parser_accepts_or_rejects_cleanly(objs):
    text = "\n".join(json.dumps(o) for o in objs)
    try:
        items = parse_prompts(text, "p", 0)
    except UserError as exc:
        assert str(exc).startswith("p:")
    else:
        assert [i.id for i in items] == [o["id"] for o in objs]


def test_json_errors_read_as_a_sentence():
    from spmd_diff.errors import UserError
    from spmd_diff.io.inputs import parse_prompts

    with pytest.raises(UserError) as info:
        parse_prompts('{"id": "c", "prompt": "abc\n', "p.jsonl", 0)
    assert "at at" not in str(info.value) and "Unterminated string starting at column" in str(info.value)
