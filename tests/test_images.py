"""Image budget, the render command, and image/mix on rendered real tables."""
import json
import random

import pytest
from PIL import Image

from hitbench_utils.__main__ import main
from hitbench_utils.config import RunConfig
from hitbench_utils.images import fit_image, image_tokens, smart_size
from hitbench_utils.run import Job
from hitbench_utils.runlog import read_log, view


def test_smart_size_matches_the_processor():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    r = random.Random(1)
    for _ in range(300):
        w, h = r.randint(40, 6000), r.randint(40, 6000)
        for lo, hi in [(65536, 16777216), (4096, 200_000)]:
            assert smart_size(w, h, lo, hi) == tuple(smart_resize(h, w, factor=32, min_pixels=lo, max_pixels=hi))[::-1]


def test_backend_image_tokens_equal_the_processor_output(tiny_backend):
    for size in [(1814, 3920), (300, 200), (5000, 400)]:
        img = Image.new("RGB", size, "white")
        grid = tiny_backend.processor.image_processor(images=[img], return_tensors="pt")["image_grid_thw"][0]
        assert tiny_backend.image_tokens(img) == int(grid.prod()) // 4
    assert image_tokens(*fit_image(Image.new("RGB", (1814, 3920)), max_pixels=1_000_000).size) <= 1_000_000 // 1024


def test_max_pixels_is_applied_and_recorded(tmp_path, tiny_backend, sample_data):
    cfg = RunConfig(data_path=str(sample_data), run_dir=str(tmp_path / "run"), modality="image", limit=3,
                    max_reasks=0, device="cpu", score=False, max_pixels=100_000)
    Job(cfg, backend=tiny_backend, progress=False).execute()
    for r in view(read_log(tmp_path / "run").records).values():
        w, h = r["image_size_sent"]
        assert w * h <= 100_000 and w % 32 == 0 and h % 32 == 0
        assert r["image_tokens"] == (w // 32) * (h // 32)
        assert r["image_size"][0] * r["image_size"][1] > w * h


def test_mix_shrinks_text_first_then_the_image(tmp_path, tiny_backend, sample_data):
    cfg = RunConfig(data_path=str(sample_data), run_dir=str(tmp_path / "run"), modality="mix", format="html", limit=2,
                    max_reasks=0, device="cpu", score=False, max_input_tokens=1150, oom_floor_pixels=32 * 32)
    Job(cfg, backend=tiny_backend, progress=False).execute()
    for r in view(read_log(tmp_path / "run").records).values():
        assert r["status"] == "ok" and r["input_tokens_sent"] <= 1150 and r["truncated"]
        assert any(d["kind"] == "image_halved" and d["detail"] == "to fit max_input_tokens=1150" for d in r["degraded"])


def test_render_command_skips_done_and_writes_a_manifest(tmp_path, sample_data, capsys):
    out = tmp_path / "img"
    assert main(["render", "--data", str(sample_data), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest) == 14 and all(e["ok"] and e["source"] == "xlsx" for e in manifest.values())  # 4 _swap
    for name, e in manifest.items():   # the sample's shipped PNGs are this renderer's output
        assert (out / f"{name}.png").read_bytes() == (sample_data / "image" / f"{name}.png").read_bytes()
    assert main(["render", "--data", str(sample_data), "--out", str(out)]) == 0
    assert "14 already there" in capsys.readouterr().out


def test_render_falls_back_to_html_when_xlsx_is_a_stub(tmp_path, sample_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    name = "sales-sample01"
    (data / "tables" / f"{name}.xlsx").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    assert main(["render", "--data", str(data), "--out", str(tmp_path / "img"), "--names", name]) == 0
    e = json.loads((tmp_path / "img" / "manifest.json").read_text())[name]
    assert e["source"] == "html" and "LFS" in e["errors"][0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_image_and_mix_end_to_end_on_rendered_real_tables(tmp_path, real_data, tiny_backend):
    import time

    from hitbench_utils.data import load_queries, select
    from hitbench_utils.render_all import render_dataset

    from hitbench_utils.data import is_lfs_pointer

    qs = select(load_queries(real_data / "QA_final.json"), limit=10)
    xlsx = [p for p in sorted((real_data / "tables").glob("*.xlsx")) if not is_lfs_pointer(p)]
    largest = max(xlsx, key=lambda p: p.stat().st_size).stem
    others = [p.stem for p in random.Random(3).sample(xlsx, 40)]
    names = sorted({q.file_name for q in qs} | {largest})
    names += [n for n in others if n not in names][: 20 - len(names)]
    t0 = time.time()
    r = render_dataset(real_data, tmp_path / "img", names=names, progress=False)
    manifest = json.loads((tmp_path / "img" / "manifest.json").read_text())
    print(f"rendered {r['rendered']} real tables in {time.time() - t0:.1f}s; largest {largest}: "
          f"{manifest[largest]['width']}x{manifest[largest]['height']} px in {manifest[largest]['seconds']}s")
    for n in names:
        print(f"  {n}: {manifest[n].get('width')}x{manifest[n].get('height')} px, {manifest[n]['seconds']}s")
    assert len(names) == 20 and r["failed"] == 0 and manifest[largest]["ok"]
    runs = [("image", "html")] + [("mix", f) for f in ("html", "latex", "csv", "markdown", "json")]
    for modality, fmt in runs:
        cfg = RunConfig(data_path=str(real_data), image_dir=str(tmp_path / "img"), run_dir=str(tmp_path / f"{modality}_{fmt}"),
                        modality=modality, format=fmt, limit=10, max_reasks=0, device="cpu", score=False,
                        max_new_tokens=4)
        s = Job(cfg, backend=tiny_backend, progress=False).execute()
        assert s["ok"] == 10, s
