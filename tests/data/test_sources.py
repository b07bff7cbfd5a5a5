"""Conversation-file sources: LLaVA-Med and Med-R1 formats, and their bad-input errors."""
import json

import numpy as np
import pytest
from PIL import Image

from medvl_jax.data import sources
from medvl_jax.data.errors import DataError


def _png(path, value=100):
    Image.fromarray(np.full((16, 20), value, np.uint8)).save(path)
    return path


def test_llava_med_jsonl(tmp_path):
    _png(tmp_path / "a.png")
    recs = [
        {"id": "q1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nIs there an effusion?"},
            {"from": "gpt", "value": "Yes."},
            {"from": "human", "value": "Which side?"},
            {"from": "gpt", "value": "Left."}]},
        {"id": "q2", "image": ["a.png", "a.png"], "conversations": [
            {"from": "human", "value": "<image> <image> Compare."},
            {"from": "gpt", "value": "Stable."}]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    src = sources.ConversationFile(str(path))
    assert len(src) == 2
    ex = src[0]
    assert ex["id"] == "q1"
    assert ex["images"] == [str(tmp_path / "a.png")]
    assert [m["role"] for m in ex["messages"]] == ["user", "assistant", "user", "assistant"]
    assert ex["messages"][2]["content"] == "Which side?"
    assert ex["meta"]["answer"] == "Left."
    assert len(src[1]["images"]) == 2
    # Records are returned as copies: a consumer mutating one does not change the source.
    src[1]["images"].clear()
    assert len(src[1]["images"]) == 2


def test_med_r1_json_list_with_image_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "x.png")
    recs = [{"image": "x.png", "problem": "Which organ? A. lung B. liver",
             "solution": "<answer> A </answer>", "modality": "CT"}]
    path = tmp_path / "medr1.json"
    path.write_text(json.dumps(recs))
    src = sources.ConversationFile(str(path), image_root=str(tmp_path / "imgs"))
    ex = src[0]
    assert ex["images"] == [str(tmp_path / "imgs" / "x.png")]
    assert ex["messages"][0]["content"] == "<image>\nWhich organ? A. lung B. liver"
    assert ex["messages"][1]["content"] == "<answer> A </answer>"
    assert ex["meta"]["answer"] == "A"
    assert ex["meta"]["modality"] == "CT"
    assert ex["id"] == f"{path}[0]"


@pytest.mark.parametrize("content, reason, where_suffix", [
    ('{"image": "a.png", "conversations": []}\n', "bad_record", ":1"),
    ('{"image": "a.png", "conversations": [{"from": "human", "value": "hi"}]}\n{bad\n',
     "bad_json", ":2"),
    ('{"image": "a.png", "question": "no format"}\n', "bad_record", ":1"),
    ('{"conversations": [{"from": "robot", "value": "x"}]}\n', "bad_record", ":1"),
    ('{"problem": "p"}\n', "bad_record", ":1"),
])
def test_bad_records_name_file_and_line(tmp_path, content, reason, where_suffix):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        sources.ConversationFile(str(path))
    assert e.value.reason == reason
    assert e.value.where == f"{path}{where_suffix}"
    assert str(path) in str(e.value)


def test_missing_file_and_non_list_json(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        sources.ConversationFile(str(tmp_path / "nope.jsonl"))
    p = tmp_path / "obj.json"
    p.write_text('{"a": 1}')
    with pytest.raises(DataError, match="JSON list"):
        sources.ConversationFile(str(p))


def test_strip_answer_tags():
    assert sources.strip_answer_tags("<think>x</think><answer> 12 mm </answer>") == "12 mm"
    assert sources.strip_answer_tags("  yes ") == "yes"


def test_empty_med_r1_answer_is_refused(tmp_path):
    path = tmp_path / "r1.jsonl"
    recs = [{"image": "a.png", "problem": "Q?", "solution": "<answer> B </answer>"},
            {"image": "a.png", "problem": "Q?", "solution": "<think>x</think><answer></answer>"}]
    path.write_text("\n".join(json.dumps(r) for r in recs))
    with pytest.raises(DataError, match=r"r1\.jsonl:2: empty answer") as e:
        sources.ConversationFile(str(path))
    assert e.value.reason == "empty_answer"


@pytest.mark.parametrize("image", ["/etc/passwd", "../outside.png", "sub/../../outside.png"])
def test_image_paths_may_not_leave_image_root(tmp_path, image):
    from medvl_jax.data import pairs, preferences

    root = tmp_path / "root"
    root.mkdir()
    conv = {"image": image, "conversations": [{"from": "human", "value": "<image> Q"},
                                              {"from": "gpt", "value": "A"}]}
    files = {"conv.jsonl": (conv, lambda p, **kw: sources.ConversationFile(p, **kw)),
             "pairs.jsonl": ({"image": image, "text": "T."},
                             lambda p, **kw: pairs.JsonlPairs(p, **kw)),
             "prefs.jsonl": ({"image": image, "prompt": "Q", "chosen": "A", "rejected": "B"},
                             lambda p, **kw: preferences.PreferenceFile(p, **kw))}
    for name, (rec, build) in files.items():
        path = root / name
        path.write_text(json.dumps(rec))
        with pytest.raises(DataError, match=rf"{name}:1: image path .* leaves image_root"):
            build(str(path))
        build(str(path), allow_outside_root=True)  # Allowed when the source says so.
    inside = root / "ok.jsonl"  # ".." that stays inside is fine.
    inside.write_text(json.dumps({**conv, "image": "sub/../a.png"}))
    assert sources.ConversationFile(str(inside))[0]["images"] == [str(root / "sub/../a.png")]
