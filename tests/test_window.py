"""The GPU window (ldm.benchmark.window): its CPU walk of every part, the dry run's estimates, and the budget logic
with a fake clock (parts skipped, rows kept on a cut-off)."""

from __future__ import annotations

import pytest
import torch

from ldm.benchmark import window, window_models as wm
from ldm.benchmark.window_parts import UNET_CONFIGS


def test_dry_run_walks_every_part_on_the_cpu(tmp_path):
    """--dry_run: the same code the GPU runs, on the tiny preset here (every part writes its rows and every check
    passes), then each part's estimated H100 seconds at full size."""
    pytest.importorskip("diffusers")
    out = tmp_path / "w.md"
    assert window.main(["--dry_run", "--compile_backend", "eager", "--steps", "4", "--iters", "1",
                        "--out", str(out)]) == 0
    text = out.read_text()
    for part in ("environment", "checks", "unet", "end_to_end", "profile", "blog_table"):
        assert f"## {part}\n" in text and f"({part}: " in text, part
    assert "failed" not in text and "FAIL" not in text
    checks = [line for line in text.splitlines() if line.endswith("| ok |")]
    assert len(checks) == 9, checks  # 3 images, compile, syncs, CUDA-graph outputs, 3 SDPA choices
    for _, label in UNET_CONFIGS[:4]:  # eager, fused + channels_last, compile, CUDA graphs: both sides timed
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        ours, theirs = (float(v) for v in row.split("|")[2:4])
        assert ours > 0 and theirs > 0, row
    assert sum(line.startswith(("| 1 | ours", "| 1 | diffusers", "| 4 | ours", "| 4 | diffusers"))
               for line in text.splitlines()) == 4
    e = wm.estimates("sd2", 4, 1)
    assert f"| end_to_end | {e['end_to_end']:.0f} |" in text and f"| checks | {e['checks']:.0f} |" in text
    # 2 sides x batch 1 x (warm-up + 3 timed) x (latents + whole image) runs of `steps` compiled calls + decode
    assert e["end_to_end"] == pytest.approx(2 * 2 * 4 * (4 / wm.H100_BEST_IT_S + 0.06))
    assert "TFLOP" in text


@pytest.mark.slow
def test_blog_table_part_runs_the_harness_on_the_tiny_preset(tmp_path):
    """Part 6 (full size only unless asked): the fresh-process table, its markdown appended to the report."""
    pytest.importorskip("diffusers")
    from ldm.benchmark.window_parts import blog_table
    w, _ = _fake_window(tmp_path, 600)
    w.opt.tiny = w.opt.blog_table = True
    blog_table(w)
    text = (tmp_path / "r.md").read_text()
    assert "| D | SDPA mem-efficient/flash, no compile | 1 |" in text and "| P | diffusers" in text


def test_unet_flops_scale_as_the_architecture_says():
    """Linear in the batch; more than 4x from a 32x32 to a 64x64 latent (convolutions 4x, self-attention 16x)."""
    one, two = wm.unet_flops("tiny", 1, 8), wm.unet_flops("tiny", 2, 8)
    assert two == pytest.approx(2 * one)
    small, large = wm.unet_flops("sd2", 1, 32), wm.unet_flops("sd2", 1, 64)
    assert 4.0 < large / small < 16.0
    assert 0.7e12 < large < 0.9e12  # SD 2's UNet, one 512x512 sample: about 0.8 TFLOP per call


def _fake_window(tmp_path, budget_s: float):
    opt = window.parse_args(["--budget_s", str(budget_s), "--out", str(tmp_path / "r.md"), "--device", "cpu"])
    now = [0.0]
    w = window.Window(opt, window.Budget(opt.budget_s, clock=lambda: now[0]), window.Report(opt.out, echo=False),
                      torch.device("cpu"), torch.float32)
    return w, now


def test_budget_skips_parts_that_no_longer_fit(tmp_path):
    w, now = _fake_window(tmp_path, 100)
    w.estimate = {"a": 10, "b": 50, "c": 30}
    ran = []

    def part(name, seconds):
        def fn(w):
            ran.append(name)
            w.report(f"row of {name}")
            now[0] += seconds
        return fn
    window.run_parts(w, (("a", part("a", 60)), ("b", part("b", 1)), ("c", part("c", 5))))
    assert ran == ["a", "c"]  # after a, 40 s are left: b (50) is skipped, c (30) runs
    text = (tmp_path / "r.md").read_text()
    assert "## b: skipped (40 s left of the budget, the part needs about 50 s)" in text
    assert "row of a" in text and "row of c" in text


def test_a_failing_part_is_a_line_and_a_cut_off_keeps_the_rows(tmp_path):
    w, now = _fake_window(tmp_path, 100)
    w.estimate = {}

    def broken(w):
        w.report("row before the error")
        raise RuntimeError("out of memory")

    def cut(w):
        w.report("row before the cut")
        raise KeyboardInterrupt  # the command's time limit: the process ends here

    with pytest.raises(KeyboardInterrupt):
        window.run_parts(w, (("broken", broken), ("after", lambda w: w.report("row of after")), ("cut", cut),
                             ("never", lambda w: w.report("never written"))))
    text = (tmp_path / "r.md").read_text()  # what is on disk, as a killed process leaves it
    assert "row before the error" in text and "**broken failed**: RuntimeError: out of memory" in text
    assert "row of after" in text and "row before the cut" in text and "never written" not in text


def test_window_flag_of_the_benchmark(tmp_path):
    from ldm.benchmark.harness import main
    with pytest.raises(SystemExit) as e:
        main(["--window", "--budget_s", "0"])
    assert e.value.code == 2
