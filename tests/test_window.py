"""The GPU window (ldm.benchmark.window): its CPU walk of every part, the dry run's estimates, and the budget logic
with a fake clock (parts skipped, rows kept on a cut-off)."""

from __future__ import annotations

import pytest
import torch

from ldm.benchmark import window, window_models as wm
from ldm.benchmark.window_parts import UNET_CONFIGS
from ldm.benchmark.window_sdxl import CONFIGS as SDXL_CONFIGS


def test_dry_run_walks_every_part_on_the_cpu(tmp_path):
    """--dry_run: the same code the GPU runs, on the tiny preset here (every part writes its rows and every check
    passes), then each part's estimated H100 seconds at full size."""
    pytest.importorskip("diffusers")
    out = tmp_path / "w.md"
    assert window.main(["--dry_run", "--compile_backend", "eager", "--steps", "4", "--iters", "1",
                        "--out", str(out)]) == 0
    text = out.read_text()
    for part in ("environment", "checks", "unet", "end_to_end", "profile", "sdxl", "blog_table"):
        assert f"## {part}\n" in text and f"({part}: " in text, part
    assert "failed" not in text and "FAIL" not in text
    checks = [line for line in text.splitlines() if line.endswith("| ok |")]
    assert len(checks) == 11, checks  # 3 images, compile, syncs, CUDA-graph outputs, 3 SDPA choices; SDXL's 2
    for _, label in UNET_CONFIGS[:4]:  # eager, fused + channels_last, compile, CUDA graphs: both sides timed
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        ours, theirs = (float(v) for v in row.split("|")[2:4])
        assert ours > 0 and theirs > 0, row
    assert sum(line.startswith(("| 1 | ours", "| 1 | diffusers", "| 4 | ours", "| 4 | diffusers"))
               for line in text.splitlines()) == 4
    # part 7 on sdxl-tiny: both sides timed in every UNet row and end to end, the same images, no second compile
    xl = text.split("## sdxl\n")[1].split("## blog_table")[0]
    for _, label, seed in SDXL_CONFIGS:
        cells = next(line for line in xl.splitlines() if line.startswith(f"| {label} |")).split("|")
        assert all(0 < float(v) < float("inf") for v in cells[2:4] + cells[5:7]) and cells[7].strip() == seed, cells
    for side in ("ours", "diffusers"):
        cells = next(line for line in xl.splitlines() if line.startswith(f"| {side} | ")).split("|")
        assert 0 < float(cells[3]) < float("inf"), cells  # s / image, each side's fastest UNet row
    assert "| ok |" in next(line for line in xl.splitlines() if "the [0, 1] images" in line)
    assert "| ok |" in next(line for line in xl.splitlines() if "graphs compiled while making the images" in line)
    assert "| + dynamic int8 | 2.43 |" in xl  # the seed's table, quoted
    e = wm.estimates("sd2", 4, 1)
    assert f"| end_to_end | {e['end_to_end']:.0f} |" in text and f"| checks | {e['checks']:.0f} |" in text
    # 2 sides x batch 1 x (warm-up + 3 timed) x (latents + whole image) runs of `steps` compiled calls + decode
    assert e["end_to_end"] == pytest.approx(2 * 2 * 4 * (4 / wm.H100_BEST_IT_S + 0.06))
    assert "TFLOP" in text and f"| sdxl | {e['sdxl']:.0f} |" in text
    assert f"| sdxl_compile | {e['sdxl_compile']:.0f} |" in text


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What a compiled UNet guards on: each tensor's dtype, shape and strides, the keywords, the other values."""
    def leaf(v):
        if torch.is_tensor(v):
            return v.dtype, tuple(v.shape), v.stride()
        return tuple(sorted((k, leaf(x)) for k, x in v.items())) if isinstance(v, dict) else v
    return tuple(leaf(a) for a in args), tuple(sorted((k, leaf(v)) for k, v in kwargs.items()))


def _spy(unet) -> list:
    """The signatures of every later call of ``unet``."""
    seen, forward = [], unet.forward
    unet.forward = lambda *a, **k: seen.append(_signature(a, k)) or forward(*a, **k)
    return seen


@torch.no_grad()
def test_the_timed_unet_calls_are_the_calls_sampling_makes(tmp_path):
    """In bf16 (ours: float32 latents, a bf16 context) the window's timed UNet calls and each side's sampling loop
    call the UNet alike, SD 2 and SDXL, ours and diffusers: the images reuse the graphs the UNet rows compiled (in fp32,
    as the dry run walks, a dtype mismatch would not show)."""
    pytest.importorskip("diffusers")
    from ldm.benchmark import window_parts as wp, window_sdxl as wx
    from ldm.benchmark.peer import generate
    from ldm.samplers.api import PLMSSampler
    opt = window.parse_args(["--tiny", "--device", "cpu", "--dtype", "bf16", "--out", str(tmp_path / "r.md")])
    w = window.setup(opt)
    seen = {"ours": _spy(w.model.model.diffusion_model), "diffusers": _spy(w.peer.unet)}
    wp.bind(w, "ours", w.model.model.diffusion_model)()
    wp.bind(w, "diffusers", w.peer.unet)()
    wp.sample(w, PLMSSampler, 2)
    generate(w.peer, [wp.PROMPT], "", 2, 9.0, wp.noise(w, 1).to(w.dtype), "latent")
    xl = wx.build(w)
    unets = {"ours": xl.model.model.diffusion_model, "diffusers": xl.peer.unet}
    seen.update({f"sdxl {side}": _spy(unet) for side, unet in unets.items()})
    for side, unet in unets.items():
        wx.bind(w, xl, side, unet)()
        xl.best[side] = ("eager", unet, 1.0)
    wx.end_to_end_rows(w, xl)
    for side, calls in seen.items():
        assert len(calls) > 2 and len(set(calls)) == 1, (side, set(calls))


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
