"""What the README promises about commands: every papermill command names its output notebook, what
papermill does without one, the report command is the notebook's, and where $HITBENCH_CACHE points."""
import json
import os
import pty
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
PAPERMILL = [sys.executable, "-m", "papermill"]


def commands(text: str, prefix: str) -> list[str]:
    """Command lines in fenced bash blocks that start with ``prefix`` (continuations joined, comments cut)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith(prefix):
                out.append(" ".join(line.split()))
    return out


def test_every_readme_papermill_command_names_its_output_notebook():
    cmds = [c for c in commands(README, "papermill ") + commands(README, "python3 -m venv") if "papermill" in c]
    assert len(cmds) >= 7
    for cmd in cmds:
        words = shlex.split(cmd[cmd.index("papermill "):].split(" && ")[0])
        assert words[1].startswith("notebooks/") and words[1].endswith(".ipynb"), cmd
        assert words[2].endswith(".ipynb") and not words[2].startswith("-"), f"no output notebook: {cmd}"


def test_the_readme_and_the_report_notebook_give_the_same_report_commands():
    nb = nbformat.read(REPO / "notebooks" / "report.ipynb", as_version=4)
    intro = nb.cells[0].source
    for prefix in ("papermill notebooks/report.ipynb", "jupyter nbconvert", "python -m hitbench_utils report"):
        assert commands(README, prefix) == commands(intro, prefix) and len(commands(intro, prefix)) == 1, prefix
    params = nb.cells[1].source       # the command's parameters are the notebook's defaults
    assert 'runs = "runs/*"' in params and 'out_dir = "report"' in params


def _notebook(tmp_path: Path) -> Path:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell("print(x * 7)")]
    nbformat.write(nb, tmp_path / "nb.ipynb")
    return tmp_path / "nb.ipynb"


def test_papermill_without_an_output_path_writes_the_notebook_to_stdout_when_piped(tmp_path):
    nb = _notebook(tmp_path)
    r = subprocess.run([*PAPERMILL, str(nb), "-p", "x", "6"], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    executed = json.loads(r.stdout)
    assert "".join(executed["cells"][-1]["outputs"][0]["text"]) == "42\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nb.ipynb"]        # no file written


def test_papermill_without_an_output_path_stops_at_a_terminal(tmp_path):
    nb = _notebook(tmp_path)
    leader, follower = pty.openpty()
    try:
        r = subprocess.run([*PAPERMILL, str(nb)], stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE,
                           text=True, timeout=120, cwd=tmp_path)
    finally:
        os.close(follower)
        os.close(leader)
    assert r.returncode == 2 and "Missing argument 'OUTPUT_PATH'" in r.stderr, r.stderr


def test_hitbench_cache_is_where_the_builds_go(tmp_path, monkeypatch):
    from hitbench_utils import sample_data
    from hitbench_utils.backends import tiny

    assert "`$HITBENCH_CACHE`, by default\n`~/.cache/hitbench`" in README
    monkeypatch.setenv("HITBENCH_CACHE", str(tmp_path))
    assert tiny.cache_root() == tmp_path and sample_data.default_dest().parent == tmp_path
    monkeypatch.delenv("HITBENCH_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    home = Path.home() / ".cache" / "hitbench"
    assert tiny.cache_root() == home and sample_data.default_dest().parent == home


def test_the_cpu_install_is_a_variant_of_the_first_setup_command():
    setup = commands(README, "python3 -m venv")
    first, cpu = setup[0], [c for c in setup if "download.pytorch.org/whl/cpu" in c]
    assert len(cpu) == 1 and "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu && " \
        "pip install -e . && " in cpu[0]
    assert cpu[0].replace("pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu && ", "") == first


def test_the_readmes_speed_figures_are_those_of_the_committed_result_file():
    """Every speed figure the README gives for one H200 is read from the merged e2e result, and its call is
    the one the README names: a re-measured result with a stale README, or the reverse, fails here."""
    results = sorted((REPO / "bench" / "results").glob("e2e-*-NVIDIA-H200.json"))
    merged = json.loads(results[-1].read_text())               # the newest merged file
    section = README[README.index("Measured on one H200 through the notebook's own path"):]
    section = section[:section.index("### ")]
    html, latex, first = (merged[k] for k in ("text_html", "text_latex", "text_html_instruction_first"))
    calls = {s["call"].split("-call-")[1].removesuffix(".json") for s in (html, latex, first)}
    assert len(calls) == 1 and f"one call ({calls.pop()})" in section
    flat = " ".join(section.split())
    expected = [f"{latex['questions']:,} questions in **{latex['full_run_min']:.1f} min**",
                f"**{latex['ratio_vs_seed_style']:.1f}x**",
                f"{html['questions']} questions in {html['wall_s']:.1f} s, **{html['ratio_vs_seed_style']:.1f}x**",
                f"would take {html['full_run_min']:.1f} min",
                f"{first['wall_s']:.1f} s, {first['full_run_min']:.1f} min scaled",
                f"{first['ratio_vs_seed_style']:.1f}x",
                f"{html['seed_style_s'] / html['seed_style_questions']:.2f} s a question",
                f"{first['seed_style_s'] / first['seed_style_questions']:.2f} s with instruction-first"]
    for figure in expected:
        assert figure in flat, f"README lacks {figure!r} (from {results[-1].name})"
    for target, got in merged["targets"].items():       # e.g. "text_html: full_run_min <= 12"
        bound = target.rsplit(" ", 1)[1]
        assert got["met"] or f"target {bound})" in flat, f"unmet {target!r} is not stated"
