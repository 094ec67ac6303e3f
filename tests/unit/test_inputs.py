import json

import pytest
from hypothesis import given, strategies as st

from spmd_diff.errors import UserError
from spmd_diff.io.inputs import parse_prompts, parse_shard, shard_items


def test_jsonl_items_and_default_seeds():
    text = "\n".join([json.dumps({"id": "a", "prompt": "x"}), json.dumps({"id": "b", "prompt": "y", "seed": 9,
                                                                          "negative_prompt": "n"})]) + "\n\n"
    items = parse_prompts(text, "p.jsonl", base_seed=100)
    assert [(i.index, i.id, i.seed, i.negative_prompt) for i in items] == [(0, "a", 100, None), (1, "b", 9, "n")]


def test_plain_text_ids_are_line_numbers():
    items = parse_prompts("a cat\na dog\n", "p.txt", base_seed=5)
    assert [(i.id, i.prompt, i.seed) for i in items] == [("0", "a cat", 5), ("1", "a dog", 6)]


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
