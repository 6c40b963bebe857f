import json

import pytest

from hitbench_utils.data import Query
from hitbench_utils.errors import ConfigError
from hitbench_utils.prompts import build_prompt, extract_answer, load_templates

Q = Query(7, "t1", "Which year had the most?", "Data Analysis", "Exploratory Analysis", "ref")


Q2 = Query(8, "t1", "How many rows?", "Structure Comprehending", "", "ref")


def test_default_layout_is_table_then_instruction_then_question_then_reminder():
    t = load_templates()
    p = build_prompt(t, Q, "text", "csv", "a,b\n1,2\n")
    text = p.messages()[-1]["content"][-1]["text"]
    assert text.index("a,b") < text.index("Pearson") < text.index(Q.question) < text.index("CorrelationRelation")
    assert p.messages()[0]["role"] == "system" and "correlation" not in p.messages()[0]["content"].lower()
    # everything before the suffix is one prefix per table: the same for questions of every type
    p2 = build_prompt(t, Q2, "text", "csv", "a,b\n1,2\n")
    assert p.system == p2.system and p.intro == p2.intro and p.suffix != p2.suffix
    assert p.suffix.startswith("\n\nTask:") and "Pearson" in p.suffix and text.endswith(p.suffix)
    assert t.share_key(Q) == t.share_key(Q2)


def test_instruction_first_layout_shares_per_table_and_instruction():
    t = load_templates("instruction-first")
    p = build_prompt(t, Q, "text", "csv", "a,b\n1,2\n")
    text = p.messages()[-1]["content"][-1]["text"]
    assert text.index("Pearson") < text.index("a,b") < text.index(Q.question) < text.index("CorrelationRelation")
    assert "Pearson" in p.intro and "Pearson" not in p.suffix and p.suffix.startswith("\n\nQuestion:")
    p2 = build_prompt(t, Q2, "text", "csv", "a,b\n1,2\n")
    assert p.intro != p2.intro and t.share_key(Q) != t.share_key(Q2)
    assert t.share_key(Q) == t.share_key(Query(9, "t2", "Another?", "Data Analysis", "Exploratory Analysis", "r"))


def test_layout_is_validated(tmp_path):
    base = json.loads(json.dumps(load_templates().data))
    for layout, match in ((["question", "table", "bogus"], "layout"), (["table", "table", "question"], "distinct"),
                          (["instruction", "question"], "table")):
        f = tmp_path / "t.json"
        f.write_text(json.dumps(dict(base, layout=layout)))
        with pytest.raises(ConfigError, match=match):
            load_templates(f)
    no_instr = {k: v for k, v in base.items() if k != "instruction"}
    f.write_text(json.dumps(no_instr))
    with pytest.raises(ConfigError, match="instruction"):
        load_templates(f)
    f.write_text(json.dumps(dict(no_instr, layout=["table", "question", "answer_format"])))
    p = build_prompt(load_templates(f), Q, "text", "csv", "x")
    assert p.suffix.startswith("\n\nQuestion:")


def test_mix_and_image_put_the_image_first():
    t = load_templates()
    assert build_prompt(t, Q, "mix", "html", "<table/>").messages()[-1]["content"][0] == {"type": "image"}
    assert build_prompt(t, Q, "text", "html", "<table/>").messages()[-1]["content"][0]["type"] == "text"


@pytest.mark.parametrize("response,viz,pred,ok", [
    ("blah\n[Final Answer]: 1955, 62170", False, "1955, 62170", True),
    ("[Final Answer]: a\nmore\n[Final Answer]: b", False, "b", True),
    ("so the Final Answer: 42", False, "42", True),
    ("no marker here\nlast line  \n\n", False, "last line", False),
    ("", False, "", False),
    ("```python\nimport pandas as pd\nplt.show()\n```\n[Final Answer]: see above", True,
     "```python\nimport pandas as pd\nplt.show()\n```\n[Final Answer]: see above", True),
    ("text\nimport pandas as pd\nplt.show()", True, "text\nimport pandas as pd\nplt.show()", False),
])
def test_extract_answer(response, viz, pred, ok):
    assert extract_answer(response, viz) == (pred, ok)


def test_custom_template_file_is_validated(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"system": {}}))
    with pytest.raises(ConfigError, match="table_intro"):
        load_templates(bad)
    with pytest.raises(ConfigError, match="prompts"):
        load_templates(tmp_path / "missing.json")
