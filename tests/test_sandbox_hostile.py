"""Hostile chart programs of our own against the sealed sandbox (DESIGN.md §8.8.4).

Each program tries one attack and draws what it achieved; every test asserts what happened on disk
(or on the wire) and in the score, not only the message. Runs as whoever runs pytest: as root (CI,
the GPU host) and as an ordinary user.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import sys
import textwrap
import uuid
from pathlib import Path

import pandas as pd
import pytest

from hitbench_utils.scoring.chart_reply import MAX_PNG_BYTES, parse_report
from hitbench_utils.scoring.charts import ChartRunner, score_chart
from hitbench_utils.scoring.records import score_record

HEAD = "import pandas as pd\nimport matplotlib.pyplot as plt\n"
REPO = Path(__file__).resolve().parents[1]


def program(body: str) -> str:
    """A flat chart program (the scorer strips every line, so no indented blocks)."""
    return HEAD + textwrap.dedent(body).strip("\n") + "\nplt.show()\n"


def hostile(logic: str) -> str:
    """A chart program whose logic has indented blocks: one ``exec`` line survives the stripping."""
    return HEAD + f"exec({textwrap.dedent(logic).strip()!r})\nplt.show()\n"


@pytest.fixture(scope="module", params=["auto", "uid"] if os.geteuid() == 0 else ["auto"])
def runner(request: pytest.FixtureRequest):
    """The server as it chooses (as root here: uid 0 without capabilities when a sandbox uid cannot
    read the Python installation) and, as root, forced to drop to a dedicated sandbox uid."""
    with ChartRunner(max_children=2, sandbox=request.param) as r:
        info = r.info()["sandbox"]
        if not info["sealed"]:
            pytest.skip(f"this machine cannot seal the chart sandbox: {info['missing_layers']}")
        yield r


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A data folder with an answer key and a table, a run folder, and a key under /tmp."""
    marker = uuid.uuid4().hex[:10]
    data = tmp_path_factory.mktemp("data")
    (data / "tables").mkdir()
    xlsx = data / "tables" / "demo-table01.xlsx"
    pd.DataFrame({"Label": ["a", "b", "c"], "Sales": [11, 22, 33]}).to_excel(xlsx, index=False)
    key = {"queries": [{"id": 1, "ProcessedAnswer": "[11, 22, 33]", "marker": marker}]}
    (data / "QA_final.json").write_text(json.dumps(key))
    tmp_key = Path(f"/tmp/hb-key-{marker}")
    tmp_key.mkdir()
    (tmp_key / "QA_final.json").write_text(json.dumps(key))
    os.chmod(tmp_key, 0o755)
    os.chmod(tmp_key / "QA_final.json", 0o644)
    run = tmp_path_factory.mktemp("run")
    (run / "samples.jsonl").write_text(json.dumps({"reference": "[11, 22, 33]", "marker": marker}) + "\n")
    yield {"data": data, "xlsx": str(xlsx), "keys": [str(data / "QA_final.json"), str(tmp_key / "QA_final.json"),
           str(run / "samples.jsonl")], "run": run, "marker": marker}
    shutil.rmtree(tmp_key, ignore_errors=True)


def test_answer_key_cannot_be_found_or_read(runner: ChartRunner, planted: dict) -> None:
    body = f"""
    import os, json
    keys = {planted['keys']!r}
    hits = [k for k in keys if os.path.exists(k)]
    for k in keys + ['/proc/1/environ', '/proc/%d/cmdline' % os.getppid(), '/proc/self/environ', '/etc/passwd']:
    \ttry: hits.append(open(k, 'rb').read(64))
    \texcept OSError: pass
    tops = ['/', '/tmp', '/root', '/home', '/proc', {str(planted['data'])!r}, {str(planted['run'])!r}, {str(REPO)!r}]
    names = ('QA_final.json', 'samples.jsonl')
    for top in tops:
    \tfor d, dirs, files in os.walk(top): hits += [os.path.join(d, f) for f in files if f in names]
    answer = None
    for h in hits:
    \ttry: answer = json.load(open(h))['queries'][0]['ProcessedAnswer']
    \texcept Exception: pass
    plt.bar(range(3), eval(answer)) if answer else plt.bar(['found'], [len(hits)])
    """
    res = score_chart(hostile(body.replace("\t", "    ")), "BarChart", "[11, 22, 33]", planted["xlsx"],
                      runner=runner)
    assert res["error"] is None and res["ECR"] is True, res
    assert res["series"] == [0.0] and res["Pass"] is False, res  # found nothing, drew nothing from the key
    assert not res["infra_error"]


def test_environment_is_an_allowlist(planted: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = f"sk-test-{planted['marker']}"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("HITBENCH_SECRET_PATH", "/somewhere/private")
    body = """
    import os
    keys = sorted(os.environ)
    plt.plot(range(len(keys)), [k + '=' + os.environ[k] for k in keys])
    """
    with ChartRunner(max_children=1) as fresh:
        res = score_chart(program(body), "LineChart", "[1]", planted["xlsx"], runner=fresh, artifacts_dir=str(tmp_path),
                          artifact_name="env")
        server_env = Path(f"/proc/{fresh.info()['sandbox']['pid']}/environ").read_bytes()
    assert res["ECR"] is True, res
    env = dict(item.split("=", 1) for item in res["series"][0])
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "HOME", "TMPDIR", "MPLCONFIGDIR", "MPLBACKEND",
                        "USER", "LOGNAME", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                        "NUMEXPR_NUM_THREADS"}, env
    assert env["HOME"] == env["TMPDIR"] and env["MPLBACKEND"] == "Agg"
    # Not in the program's environment, not in the server's (whose memory every child inherits), not on disk.
    assert secret.encode() not in server_env and b"HITBENCH_" not in server_env
    assert secret not in (tmp_path / "env.json").read_text()


def test_parent_redacts_known_secrets(planted: dict, runner: ChartRunner, tmp_path: Path) -> None:
    secret = f"tok-{planted['marker']}"
    body = f"raise ValueError('the key is {secret}')"
    record = {"id": 7, "question_type": "Visualization", "sub_qtype": "BarChart Generation", "status": "ok",
              "prediction": program(body), "reference": "[1]"}
    import hitbench_utils.scoring.charts as charts

    old, charts._runner = charts._runner, runner
    try:
        out = score_record(record, xlsx_path=planted["xlsx"], artifacts_dir=str(tmp_path), secrets=[secret])
    finally:
        charts._runner = old
    assert out["score_status"] == "scored" and out["scores"] == {"ECR": False, "Pass": False}
    assert "[redacted]" in out["score_detail"]["chart_error"] and secret not in json.dumps(out)
    stored = (tmp_path / "7.json").read_text()
    assert "[redacted]" in stored and secret not in stored


def test_no_metadata_changes_outside(runner: ChartRunner, planted: dict, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("intact")
    os.chmod(victim, 0o600)
    os.utime(victim, (1_000_000, 1_000_000))
    visible = os.__file__  # in the Python installation, which the program can see (read-only)
    before = (os.stat(visible).st_mode, os.stat(visible).st_mtime_ns)
    body = f"""
    import os
    v, lib = {str(victim)!r}, {visible!r}
    st = os.stat(lib)
    ops = [lambda: os.chmod(v, 0o777), lambda: os.utime(v, (0, 0)), lambda: os.rename(v, v + '.x'),
    lambda: os.link(v, 'here'), lambda: os.truncate(v, 0), lambda: os.chown(v, 4321, 4321),
    lambda: os.setxattr(v, 'user.hb', b'1'), lambda: open(v, 'a').write('x'),
    lambda: os.chmod(lib, st.st_mode & 0o7777), lambda: os.utime(lib, ns=(st.st_atime_ns, st.st_mtime_ns)),
    lambda: os.chown(lib, st.st_uid, st.st_gid), lambda: open('own.txt', 'w').write('mine')]
    done = []
    for i, op in enumerate(ops):
    \ttry: op(); done.append(i)
    \texcept OSError: pass
    plt.bar(range(len(done) + 1), [-1] + done)
    """
    res = score_chart(hostile(body.replace("\t", "    ")), "BarChart", "[-1]", planted["xlsx"], runner=runner)
    assert res["ECR"] is True, res
    assert res["series"] == [-1.0, 11.0], res  # only writing its own file in its own folder worked
    assert victim.read_text() == "intact" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert victim.stat().st_mtime == 1_000_000 and sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
    assert (os.stat(visible).st_mode, os.stat(visible).st_mtime_ns) == before


def test_forged_replies_cannot_claim_more(runner: ChartRunner, planted: dict, tmp_path: Path) -> None:
    fd_loop = "for fd in range(3, 64):\n\ttry: os.write(fd, DATA)\n\texcept OSError: pass\nos._exit(0)"
    forged = b'{"ECR": true, "series": [9.0], "Pass": true, "infra_error": true, "missing_input": true, "id": 999}'
    cases = {
        "fields": forged,
        "junk": b'{"ECR": "yes", ',
        "setup-failure": b"Esandbox setup failed: pretend",
        "stdout": None,
    }
    for name, data in cases.items():
        if data is None:
            body = "import json\nprint(json.dumps({'ECR': True, 'series': [9.0], 'infra_error': True}))\nplt.bar([0], [1])"
        else:
            body = f"import os\nDATA = {data!r}\n" + fd_loop.replace("\t", "    ")
        res = score_chart(hostile(body) if data else program(body), "BarChart", "[1]", planted["xlsx"], runner=runner)
        assert res["infra_error"] is False and res["missing_input"] is False, (name, res)
        if name == "fields":  # what it forged is what it could have drawn: [9] is not the answer
            assert (res["ECR"], res["Pass"], res["series"]) == (True, False, [9.0]), res
        elif name == "stdout":
            assert (res["ECR"], res["Pass"], res["series"]) == (True, True, [1.0]), res
        else:
            assert res["ECR"] is False and "malformed" in res["error"], (name, res)
    # An oversized PNG is refused and never written; an oversized reply is malformed.
    big_png = ("import os, json, base64\n"
               f"png = base64.b64encode(bytes([137, 80, 78, 71, 13, 10, 26, 10]) + b'0' * {MAX_PNG_BYTES + 10})\n"
               "DATA = json.dumps({'ECR': True, 'series': [1.0], 'png': png.decode()}).encode()\n")
    res = score_chart(hostile(big_png + fd_loop.replace("\t", "    ")), "BarChart", "[1]", planted["xlsx"],
                      runner=runner, artifacts_dir=str(tmp_path), artifact_name="big")
    assert (res["ECR"], res["Pass"]) == (True, True) and "PNG refused" in res.get("render_error", ""), res
    assert not (tmp_path / "big.png").exists()
    flood = ("import os\nDATA = b'x' * (1 << 20)\nfor fd in range(3, 64):\n"
             "    try: [os.write(fd, DATA) for _ in range(40)]\n    except OSError: pass\nos._exit(0)")
    res = score_chart(hostile(flood), "BarChart", "[1]", planted["xlsx"], runner=runner)
    assert res["ECR"] is False and "malformed" in res["error"] and not res["infra_error"], res


def test_reply_schema_unit() -> None:
    ok = parse_report(b'{"ECR": true, "series": [[1, NaN], "t"], "error": null, "extra": 1, "infra_error": true}')
    assert ok["ECR"] is True and ok["series"][1] == "t" and "infra_error" not in ok and "extra" not in ok
    assert "malformed" in parse_report(b'[1]')["error"]
    assert "malformed" in parse_report(b'{"ECR": true, "series": [true]}')["error"]
    assert "malformed" in parse_report(b'{"ECR": true, "series": ["' + b"x" * 2000 + b'"]}')["error"]
    assert len(parse_report(b'{"ECR": false, "error": "' + b"e" * 50_000 + b'"}')["error"]) < 2100


def test_disk_quota(runner: ChartRunner, planted: dict) -> None:
    fill = ("import os\nchunk = b'0' * (1 << 20)\nn = 0\n"
            "for i in range(400):\n    f = open('fill%d' % (i // 32), 'ab'); f.write(chunk); f.close(); n += 1\n"
            "plt.bar([0], [n])")
    free_before = shutil.disk_usage("/tmp").free
    res = score_chart(hostile(fill), "BarChart", "[400]", planted["xlsx"], runner=runner, timeout=20)
    assert res["ECR"] is False and "No space left on device" in res["error"], res
    assert shutil.disk_usage("/tmp").free > free_before - (40 << 20)  # nothing landed on the real disk
    small = "import os\nopen('ok.bin', 'wb').write(b'0' * (8 << 20))\nplt.bar([0], [os.path.getsize('ok.bin')])"
    res = score_chart(program(small), "BarChart", f"[{8 << 20}]", planted["xlsx"], runner=runner)
    assert (res["ECR"], res["Pass"]) == (True, True), res


def test_no_processes_threads_or_exec(runner: ChartRunner, planted: dict) -> None:
    body = """
    import os, threading, subprocess
    ok = []
    for name, op in [('fork', os.fork), ('thread', lambda: threading.Thread(target=print).start()),
    ('exec', lambda: subprocess.run(['/bin/true'])), ('execv', lambda: os.execv('/usr/bin/true', ['true']))]:
    \ttry: pid = op(); ok.append(name); os._exit(0) if pid == 0 else None
    \texcept Exception: pass
    plt.bar(range(len(ok) + 1), [-1] + [1] * len(ok))
    """
    res = score_chart(hostile(body.replace("\t", "    ")), "BarChart", "[-1]", planted["xlsx"], runner=runner)
    assert (res["ECR"], res["series"]) == (True, [-1.0]), res


def test_no_network(runner: ChartRunner, planted: dict) -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    tcp.settimeout(0.5)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    body = f"""
    import socket
    ok = []
    for name, op in [('tcp', lambda: socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=1)),
    ('udp', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp.getsockname()[1]}))),
    ('unix', lambda: socket.socket(socket.AF_UNIX).connect('/run/systemd/private'))]:
    \ttry: op(); ok.append(name)
    \texcept OSError: pass
    plt.bar(range(len(ok) + 1), [-1] + [1] * len(ok))
    """
    try:
        res = score_chart(hostile(body.replace("\t", "    ")), "BarChart", "[-1]", planted["xlsx"], runner=runner)
        assert (res["ECR"], res["series"]) == (True, [-1.0]), res
        with pytest.raises(socket.timeout):
            tcp.accept()  # nobody connected
        with pytest.raises(socket.timeout):
            udp.recv(16)  # nothing arrived
    finally:
        tcp.close()
        udp.close()


_BREAK = {  # a confinement layer whose setup fails, simulated inside the server process
    "landlock": "import hitbench_utils.scoring.landlock as m; m.landlock_abi = lambda: 0",
    "landlock-setup": ("import hitbench_utils.scoring.landlock as m\n"
                       "def f(*a, **k): raise OSError(1, 'simulated landlock_restrict_self failure')\n"
                       "m.restrict_filesystem = f"),
    "quota": ("import hitbench_utils.scoring.quota as m\n"
              "def f(): raise OSError(1, 'simulated unshare failure')\nm.enter_private_mounts = f"),
    "seccomp": "import hitbench_utils.scoring.sandbox as m; m.seccomp_supported = lambda: False",
}


@pytest.mark.parametrize("layer", sorted(_BREAK))
def test_broken_layer_fails_closed(layer: str, planted: dict, tmp_path: Path) -> None:
    wrapper = tmp_path / "python"
    patch = _BREAK[layer] + "\nimport sys\nfrom hitbench_utils.scoring.chart_server import main\nmain(sys.argv[3:])\n"
    (tmp_path / "patch.py").write_text(patch)
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'patch.py'} \"$@\"\n")
    wrapper.chmod(0o755)
    outside = tmp_path / "open"
    outside.mkdir()
    outside.chmod(0o777)
    body = f"open({str(outside / 'ran')!r}, 'w').write('unconfined')\nplt.bar([0], [1])"
    record = {"id": 3, "question_type": "Visualization", "sub_qtype": "BarChart Generation", "status": "ok",
              "prediction": program(body), "reference": "[1]"}
    import hitbench_utils.scoring.charts as charts

    with ChartRunner(max_children=1, python=str(wrapper)) as broken:
        assert broken.info()["sandbox"]["sealed"] is False
        old, charts._runner = charts._runner, broken
        try:
            out = score_record(record, xlsx_path=planted["xlsx"])
            unsealed = score_chart(program("plt.bar([0], [1])"), "BarChart", "[1]", planted["xlsx"],
                                   runner=broken, allow_unsealed=True)
        finally:
            charts._runner = old
    assert out["score_status"] == "error" and out["scores"] == {}, out
    assert "chart_allow_unsealed" in out["score_error"] and "cannot be sealed" in out["score_error"]
    assert not (outside / "ran").exists()  # the program never ran
    assert unsealed["ECR"] is True and unsealed["unsealed"], unsealed  # opt-in: runs, and says what is missing


def test_read_roots_hold_no_project_data_or_temp(planted: dict) -> None:
    from hitbench_utils.scoring.landlock import exposed_by, read_roots

    roots = read_roots()
    assert any(r.endswith(("site-packages", "dist-packages")) for r in roots)
    for path in (str(REPO), "/tmp", os.path.expanduser("~"), str(planted["data"]), str(planted["run"]), "/proc"):
        assert exposed_by(path, roots) is None, (path, exposed_by(path, roots))
    assert exposed_by("/usr/lib/x/QA_final.json", ["/usr/lib"]) == "/usr/lib"  # the server refuses such a dataset


def test_server_leaves_nothing_behind(planted: dict) -> None:
    from hitbench_utils.scoring.confinement import temp_root

    with ChartRunner(max_children=1) as r:
        pid = r.info()["sandbox"]["pid"]
        res = score_chart(program("open('junk.bin', 'wb').write(b'0' * 1000)\nplt.bar([0], [1])"), "BarChart", "[1]",
                          planted["xlsx"], runner=r)
        assert res["ECR"] is True, res
    assert not [n for n in os.listdir(temp_root()) if n.startswith(f"hitbench-charts-{pid}-")]
    assert os.path.isfile(os.__file__) and os.path.isdir(os.path.dirname(pd.__file__))  # binds were detached first
