import json

import pytest

from hitbench_utils import data as D
from hitbench_utils.errors import ConfigError, DataError, MissingInputError

ITEM = {"id": 1, "FileName": "t", "Question": "q", "QuestionType": "Fact Checking", "SubQType": "Value-Matching",
        "ProcessedAnswer": "a"}


def write(tmp_path, obj, name="QA_final.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_malformed_json_names_line(tmp_path):
    with pytest.raises(DataError, match="not valid JSON .line 1"):
        D.load_queries(write(tmp_path, '{"queries": [ {'))


def test_missing_field_names_item_and_field(tmp_path):
    bad = dict(ITEM)
    del bad["Question"]
    with pytest.raises(DataError, match=r"item #1 \(id=2\) lacks field\(s\) Question"):
        D.load_queries(write(tmp_path, {"queries": [ITEM, dict(bad, id=2)]}))


def test_duplicate_ids_refused(tmp_path):
    with pytest.raises(DataError, match="more than once"):
        D.load_queries(write(tmp_path, {"queries": [ITEM, ITEM]}))


def test_select_filters_and_unknown_ids(tmp_path):
    qs = D.load_queries(write(tmp_path, {"queries": [dict(ITEM, id=i, QuestionType=t) for i, t in
                                                      [(1, "Fact Checking"), (2, "Visualization"), (3, "Fact Checking")]]}))
    assert [q.id for q in D.select(qs, ids="[3, 1]")] == [3, 1]
    assert [q.id for q in D.select(qs, question_type="Fact Checking", limit=1)] == [1]
    with pytest.raises(ConfigError, match=r"ids=\[9\]"):
        D.select(qs, ids=[9])
    with pytest.raises(ConfigError, match="Fact Checking"):
        D.select(qs, question_type="Trivia")


def test_parse_ids_forms():
    assert D.parse_ids("[1, 2]") == [1, 2] and D.parse_ids("1,2") == [1, 2] and D.parse_ids(None) is None
    with pytest.raises(ConfigError):
        D.parse_ids("[a")


def test_missing_empty_and_lfs_tables(tmp_path):
    (tmp_path / "html").mkdir()
    with pytest.raises(MissingInputError, match="not found"):
        D.read_table(tmp_path, "html", "nope")
    (tmp_path / "html" / "empty.html").write_text("")
    with pytest.raises(MissingInputError, match="empty"):
        D.read_table(tmp_path, "html", "empty")
    (tmp_path / "html" / "stub.html").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12345\n")
    with pytest.raises(MissingInputError, match="Git LFS pointer stub.*git lfs pull"):
        D.read_table(tmp_path, "html", "stub")


def test_corrupt_png_is_missing_input(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(MissingInputError, match="cannot be decoded"):
        D.load_image(tmp_path, "x")


def test_unknown_modality_names_allowed_values():
    with pytest.raises(ConfigError, match="text, image, mix"):
        D.check_choice("modality", "audio", D.MODALITIES)


def test_real_qa_files_load(real_data):
    qs = D.load_queries(real_data / "QA_final.json")
    assert len(qs) == 3071
    odd = {q.id: q.sub_qtype for q in qs if q.id in (2193, 2294)}
    assert odd == {2193: "Non-adverse, Adverse, Cancelled", 2294: ""}
    assert len(D.load_queries(real_data / "QA_structure.json")) == 396
    with pytest.raises(MissingInputError, match="LFS"):
        D.read_table(real_data, "markdown", "agriculture-table06")
