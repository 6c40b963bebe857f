"""Command line: status · grid · checkpoint · rescore · render · tiny · sample · report · worker."""
from __future__ import annotations

import argparse
import json
import sys


def _params(pairs: list[list[str]] | None) -> dict:
    out = {}
    for k, v in pairs or []:
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hitbench_utils", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="what a run folder holds, and a one-line verdict")
    s.add_argument("run_dirs", nargs="+")
    s.add_argument("--json", action="store_true")
    g = sub.add_parser("grid", help="run the infer notebook for each modality × format, with resume")
    g.add_argument("--modality", nargs="+", default=["text"])
    g.add_argument("--format", nargs="+", default=["html"])
    g.add_argument("--runs-root", default="runs")
    g.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="a notebook parameter, as with papermill -p (JSON values are parsed)")
    c = sub.add_parser("checkpoint", help="export checkpoint.json in the old scripts' shape")
    c.add_argument("run_dir")
    r = sub.add_parser("rescore", help="recompute every score from the stored outputs, without a model")
    r.add_argument("run_dir")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--chart-compat", action="store_true", help="emulate the original harness's exec scoping")
    r.add_argument("--chart-allow-unsealed", action="store_true",
                   help="run chart programs even where a sandbox layer is missing on this machine (weaker)")
    r.add_argument("--judge-base-url", default=None)
    r.add_argument("--judge-model", default=None)
    r.add_argument("--judge-api-key-env", default="OPENAI_API_KEY")
    r.add_argument("--dry-run", action="store_true", help="compare only; write nothing")
    r.add_argument("--structure-reference", choices=("gold", "consistency"), default=None,
                   help="the SC protocol the run's numbers use (default: the one it was run with); both are stored")
    r.add_argument("--judge-max-table-tokens", type=int, default=16_000,
                   help="the table in the judge's prompt is cut to this many tokens (0: no table)")
    rd = sub.add_parser("render", help="draw table PNGs from the xlsx (html fallback) for a dataset without images")
    rd.add_argument("--data", required=True, help="the RealHiTBench folder (read only)")
    rd.add_argument("--out", required=True, help="the image folder to write (pass it as image_dir to runs)")
    rd.add_argument("--names", nargs="*", default=None, help="only these tables (file names without extension)")
    rd.add_argument("--force", action="store_true", help="re-render images that already exist")
    sub.add_parser("tiny", help="build (once) the tiny random Qwen3-VL and print its folder")
    sp = sub.add_parser("sample", help="write (once) the embedded sample dataset and print its folder")
    sp.add_argument("--out", default=None)
    rp = sub.add_parser("report", help="tables (csv, md, tex), PNG figures and an HTML page from run folders")
    rp.add_argument("runs", nargs="+", help="run folders or globs")
    rp.add_argument("--out", default="report", help="the output folder (default: report)")
    w = sub.add_parser("worker", help="one data-parallel rank (RANK/WORLD_SIZE/LOCAL_RANK from the environment, "
                       "as accelerate launch sets them); see num_processes")
    w.add_argument("spec", nargs="?", default=None, help="a launch.json (the run's parameters); or use -p")
    w.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"))
    a = ap.parse_args(argv)

    if a.cmd == "status":
        from .errors import HitbenchError
        from .status import format_status, summarize

        worst = 0
        for d in a.run_dirs:
            try:
                s = summarize(d)
            except HitbenchError as e:      # a damaged run file: say which and where, no traceback
                print(f"run folder:  {d}\nerror: {e}", file=sys.stderr)
                worst = 2
                continue
            print(json.dumps(s, indent=1, default=str) if a.json else format_status(s))
            worst = max(worst, 0 if s["verdict"].startswith("complete") else 1)
        return worst
    if a.cmd == "grid":
        from .grid import format_grid, run_grid

        rows = run_grid(a.modality, a.format, runs_root=a.runs_root, params=_params(a.param))
        print(format_grid(rows))
        return 0 if all(r["outcome"] == "ran" for r in rows) else 1
    if a.cmd == "checkpoint":
        from .status import export_checkpoint

        print(export_checkpoint(a.run_dir))
        return 0
    if a.cmd == "rescore":
        from .runfolder import RunFolder
        from .rescore import format_rescore, rescore_run

        judge = None
        if a.judge_base_url and a.judge_model:
            from pathlib import Path

            from .scoring import Judge

            from .runlog import read_log
            from .scoring.judge_table import JudgeTables

            head = read_log(a.run_dir).header or {}
            conf = head.get("config") or {}
            tables = JudgeTables(head.get("data_path") or ".", None if conf.get("modality") == "image" else conf.get("format"),
                                 a.judge_max_table_tokens, conf.get("table_encoding"))
            judge = Judge(a.judge_base_url, a.judge_model, api_key_env=a.judge_api_key_env,
                          cache_path=str(RunFolder(a.run_dir).judge_cache), tables=tables)
            if a.dry_run:  # read the cache, never append to it
                judge._load_cache()
                judge.cache_path = None
        print(format_rescore(rescore_run(a.run_dir, workers=a.workers, chart_compat=a.chart_compat, judge=judge,
                                         write=not a.dry_run, chart_allow_unsealed=a.chart_allow_unsealed,
                                         progress=True, structure_reference=a.structure_reference)))
        return 0
    if a.cmd == "render":
        from .render_all import format_render, render_dataset

        r = render_dataset(a.data, a.out, names=a.names, force=a.force)
        print(format_render(r))
        return 1 if r["errors"] else 0      # tables that are only LFS stubs are listed, not failures
    if a.cmd == "tiny":
        from .backends.tiny import tiny_model_dir

        print(tiny_model_dir())
        return 0
    if a.cmd == "sample":
        from .sample_data import ensure_sample_dataset

        print(ensure_sample_dataset(a.out))
        return 0
    if a.cmd == "worker":
        from pathlib import Path

        from .parallel import rank_from_env, worker_config
        from .run import Job

        rank, _, local_rank = rank_from_env() or (0, 1, 0)
        spec = json.loads(Path(a.spec).read_text()) if a.spec else _params(a.param)
        job = Job(worker_config(spec, rank, local_rank), progress=False)
        s = job.execute()
        print(s["verdict"])
        return 0
    if a.cmd == "report":
        from .report import build_report, text_table, write_html

        rep = build_report(a.runs, a.out)
        print(text_table(rep.tables["runs"].drop(columns=["verdict"])) + "\n" + rep.paper_md)
        print(f"wrote {len(rep.files) + 1} files to {rep.out_dir}; open {write_html(rep)}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
