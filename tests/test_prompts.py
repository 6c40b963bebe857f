import json

import pytest

from hitbench_utils.data import Query
from hitbench_utils.errors import ConfigError
from hitbench_utils.prompts import build_prompt, extract_answer, load_templates

Q = Query(7, "t1", "Which year had the most?", "Data Analysis", "Exploratory Analysis", "ref")


def test_table_comes_before_question_then_reminder():
    t = load_templates()
    p = build_prompt(t, Q, "text", "csv", "a,b\n1,2\n")
    text = p.messages()[-1]["content"][-1]["text"]
    assert text.index("a,b") < text.index(Q.question) < text.index("CorrelationRelation")
    assert p.messages()[0]["role"] == "system" and "correlation" in p.messages()[0]["content"].lower()


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
