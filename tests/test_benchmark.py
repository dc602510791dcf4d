"""The benchmark harness (ldm.benchmark.harness) end to end on the tiny config, and its pieces.

The end-to-end runs start fresh processes per run, as the harness does, so they are small: N=1, 64x64,
2 PLMS steps, one CPU thread per run (two threads on a shared two-core machine can be 100x slower).
"""

from __future__ import annotations

import csv
import importlib.util
import re
import statistics

import pytest
import torch

from conftest import ROOT, TINY
from ldm.benchmark import harness as benchmark, report as benchmark_report
from ldm.benchmark.measure import estimate_peak_bytes
from ldm.benchmark.unet import largest_fit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def harness(tmp_path, cache, configs: str, *extra: str, repeats: int = 1, device: str = "cpu",
            model: str = "tiny") -> str:
    """Run ldm-benchmark in this process (its runs are subprocesses); returns the output files' prefix."""
    out = tmp_path / "out"
    argv = ["--random", model, "--cache_dir", str(cache), "--device", device, "--H", "64", "--W", "64",
            "--steps", "2", "--repeats", str(repeats), "--configs", configs, "--unet_iters", "2", "--threads", "1",
            "--memory_budget_gb", "1", "--outdir", str(out), "--name", "t", *extra]
    assert benchmark.main(argv) == 0
    return str(out / "t")


def read_csv(path: str) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def markdown_rows(text: str) -> dict[tuple[int, str], dict[str, str]]:
    """{(batch, config): {column: cell}} from the per-batch tables of the markdown report."""
    rows, batch, head = {}, None, None
    for line in text.splitlines():
        m = re.match(r"### Batch size (\d+)", line)
        if m:
            batch, head = int(m.group(1)), None
        elif line.startswith("### "):
            batch = None
        elif batch is not None and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if head is None:
                head = cells
            else:
                rows[(batch, cells[0])] = dict(zip(head, cells))
    return rows


def check_outputs(prefix: str, configs: list[str], repeats: int, peer: bool = True, device: str = "cpu") -> None:
    """CSV columns, row counts, positive numbers, summary = runs, speed-ups = mean ratios, markdown, charts."""
    fields, runs = read_csv(prefix + "-runs.csv")
    assert fields == benchmark_report.RUN_FIELDS
    assert len(runs) == len(configs) * repeats
    assert [r["config"] for r in runs] == configs * repeats  # interleaved: A C D P, A C D P, ...
    for r in runs:
        assert r["status"] == "ok", r
        secs = float(r["seconds"])
        assert secs > 0 and float(r["peak_mem_mb"]) > 0 and float(r["process_s"]) > secs
        assert float(r["images_per_s"]) == pytest.approx(int(r["images"]) / secs)
        assert r["images"] == "2" and r["device"] == device and r["torch"] == torch.__version__
        assert r["code"] and r["code"] == runs[0]["code"]  # the commit measured, the same for every run

    fields, summary = read_csv(prefix + "-summary.csv")
    assert fields == benchmark_report.SUMMARY_FIELDS
    assert [s["config"] for s in summary] == configs
    mean = {s["config"]: float(s["mean_s"]) for s in summary}
    for s in summary:
        own = [float(r["seconds"]) for r in runs if r["config"] == s["config"]]
        assert mean[s["config"]] == pytest.approx(statistics.fmean(own))
        assert float(s["min_s"]) == pytest.approx(min(own)) and float(s["max_s"]) == pytest.approx(max(own))
        assert float(s["speedup_vs_A"]) == pytest.approx(mean["A"] / mean[s["config"]])
        if peer:
            assert float(s["speedup_vs_P"]) == pytest.approx(mean["P"] / mean[s["config"]])

    with open(prefix + ".md", encoding="utf-8") as f:
        text = f.read()
    table = markdown_rows(text)
    assert sorted(k[1] for k in table) == sorted(configs)
    for key in configs:
        row = table[(1, key)]
        assert float(row["mean s"]) == pytest.approx(mean[key], rel=1e-3)
        assert float(row["speed-up vs A"].rstrip("x")) == pytest.approx(mean["A"] / mean[key], abs=1e-3)
        if peer:
            assert float(row["speed-up vs diffusers (P)"].rstrip("x")) == pytest.approx(mean["P"] / mean[key],
                                                                                       abs=1e-3)
    if peer:
        assert re.search(r"D/P = (\d+\.\d+)", text).group(1) == f"{mean['D'] / mean['P']:.3f}"

    fields, unet = read_csv(prefix + "-unet.csv")
    assert fields == benchmark_report.UNET_FIELDS
    assert [u["config"] for u in unet] == configs
    for u in unet:
        assert u["status"] == "ok", u
        assert float(u["ms_mean"]) > 0 and float(u["first_call_s"]) > 0 and float(u["peak_mem_mb"]) > 0
    fit = {u["config"]: int(u["fit_res"]) for u in unet}
    # 1 GiB: the math paths' (B, heads, T, T) scores (2 GiB in fp16 at 1024x1024) stop them below 1024x1024;
    # the fused SDPA kernels reach 2048x2048.
    assert fit["A"] < 1024 and fit["C"] < 1024 and fit["D"] == 2048

    for chart in ("-summary.png", "-runs.png"):
        with open(prefix + chart, "rb") as f:
            assert f.read(8) == PNG_MAGIC


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


def test_harness_tiny_end_to_end(tmp_path, cache):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    check_outputs(harness(tmp_path, cache, "A,C,D,P"), ["A", "C", "D", "P"], repeats=1)


@pytest.mark.slow
def test_harness_tiny_all_configs(tmp_path, cache):
    """A, C, D, E (compile), P, PC (diffusers compiled) and an extra, twice over, with the peer check."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    prefix = harness(tmp_path, cache, "A,B,C,D,E,P,PC", "--check", "--extra", "mha:--attention mha", repeats=2)
    with open(prefix + ".md", encoding="utf-8") as f:
        text = f.read()
    has_xformers = importlib.util.find_spec("xformers") is not None
    assert ("B (xFormers) skipped" in text) != has_xformers
    check_outputs(prefix, ["A", "B", "C", "D", "E", "P", "PC", "mha"] if has_xformers
                  else ["A", "C", "D", "E", "P", "PC", "mha"], repeats=2)
    assert "peer check" in text and "E/PC = " in text


@pytest.mark.gpu
def test_harness_tiny_cuda(tmp_path, cache):
    """On a GPU: CUDA-event timings, max_memory_allocated, and the budget search with real forwards."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    prefix = harness(tmp_path, cache, "A,C,D,E,P", device="cuda")
    check_outputs(prefix, ["A", "C", "D", "E", "P"], repeats=1, device="cuda")
    _, unet = read_csv(prefix + "-unet.csv")
    assert {u["fit_method"] for u in unet} == {"measure"} and {u["peak_kind"] for u in unet} == {"cuda_max_allocated"}


def test_peer_matches_ours(cache):
    """diffusers' pipeline, converted by the harness, samples the same latents and images from the same noise."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from ldm.benchmark.export import cached_export
    from ldm.benchmark.peer import check
    config, ckpt, _ = benchmark.prepare_model(benchmark.parse_args(["--random", "tiny", "--cache_dir", str(cache)]))
    errors = check(config, ckpt, cached_export(config, ckpt, str(cache)), steps=4, size=64)
    assert errors["text"] < 1e-5 and errors["latents"] < 1e-4 and errors["images"] < 1e-4, errors


def test_peer_pipeline_with_cloned_unet_outputs(cache):
    """With CUDA graphs the peer's UNet is wrapped like ours (runtime.CloneOutput): diffusers' pipeline accepts the
    wrapper, and unguided PNDM, which keeps the UNet's raw outputs, goes wrong over a buffer-reusing UNet
    (a CUDA-graph replay's semantics, imitated on the CPU) unless they are cloned."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from torch import nn
    from ldm.benchmark.export import cached_export
    from ldm.benchmark.peer import build_pipeline, generate
    from ldm.speed.runtime import CloneOutput

    class ReplayLike(nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet, self.out = unet, None

        def forward(self, *args, **kwargs):
            out = self.unet(*args, **kwargs)[0]
            self.out = torch.empty_like(out) if self.out is None else self.out
            return (self.out.copy_(out),)

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self._modules["unet"], name)

    config, ckpt = random_model(cache, "tiny")
    pipe = build_pipeline(cached_export(config, ckpt, str(cache)), torch.device("cpu"), torch.float32)
    unet = pipe.unet
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.no_grad():
        for name, wrapped in (("eager", unet), ("shared", ReplayLike(unet)), ("cloned", CloneOutput(ReplayLike(unet)))):
            pipe.unet = wrapped
            out[name] = generate(pipe, ["a photo"], "", 6, 1.0, x_T.clone(), output_type="latent")
    assert (out["shared"] - out["eager"]).abs().max() > 1e-2 * out["eager"].abs().max()  # the hazard is real
    assert torch.equal(out["cloned"], out["eager"])


def test_select_configs_and_extras():
    opt = benchmark.parse_args(["--random", "tiny", "--configs", "A,B,D", "--extra", "bf16:--dtype bf16 --compile"])
    chosen, notes = benchmark.select_configs(opt)
    keys = [c.key for c in chosen]
    assert keys[0] == "A" and keys[-2:] == ["D", "bf16"]
    assert chosen[-1].flags == ("--dtype", "bf16", "--compile")
    assert ("B" in keys) != any("xformers is not installed" in n for n in notes)
    with pytest.raises(SystemExit):
        benchmark.select_configs(benchmark.parse_args(["--random", "tiny", "--configs", "Z"]))


def test_summary_speedups():
    rows = [{"batch": 1, "config": c, "label": c, "status": "ok", "seconds": s, "images": 2, "process_s": 2 * s,
             "peak_mem_mb": 1.0} for c, s in [("A", 4.0), ("D", 2.0), ("P", 3.0), ("A", 6.0), ("D", 2.0), ("P", 3.0)]]
    rows.append({"batch": 1, "config": "D", "status": "failed (exit 1): boom"})
    by = {s["config"]: s for s in benchmark_report.summarize(rows)}
    assert by["A"]["mean_s"] == 5.0 and by["D"]["runs"] == 2
    assert by["D"]["speedup_vs_A"] == 2.5 and by["D"]["speedup_vs_P"] == 1.5 and by["P"]["speedup_vs_A"] == 5 / 3
    assert by["D"]["images_per_s"] == 1.0


def test_largest_fit_binary_search():
    sizes = list(range(256, 2049, 128))
    for limit in (100, 256, 700, 1024, 2048, 5000):
        probed = []
        best = largest_fit(lambda r: probed.append(r) or r <= limit, sizes)
        assert best == max((s for s in sizes if s <= limit), default=None)
        assert len(probed) <= 4


def test_memory_estimate_math_is_quadratic_sdpa_is_not():
    """Fake-tensor estimate: 2x the side is 16x the math path's (B, heads, T, T) scores, not the fused kernel's."""
    from ldm.model.attention import set_attention_backend
    from ldm.model.presets import load_config
    from ldm.model.unet import UNetModel
    cfg = load_config(TINY).unet

    def activations(backend: str, side: int) -> int:
        def build():
            unet = UNetModel(cfg)
            set_attention_backend(unet, backend)
            return unet
        inputs = lambda: (torch.randn(2, 4, side, side), torch.tensor([1, 1]), torch.randn(2, 77, cfg.context_dim))
        return estimate_peak_bytes(build, inputs)["activations"]

    side = 64
    scores = 2 * cfg.heads_at(cfg.model_channels)[0] * (side * side) ** 2 * 4  # one fp32 (B, heads, T, T)
    math_small, math_big = activations("math", side), activations("math", 2 * side)
    sdpa_small, sdpa_big = activations("sdpa", side), activations("sdpa", 2 * side)
    assert scores <= math_small < 4 * scores
    assert 12 < math_big / math_small <= 16.5
    assert sdpa_big / sdpa_small < 5 and sdpa_small < scores / 4


def test_ladder_adds_one_technique_per_step():
    from ldm.benchmark.ladder import cumulative, steps, table
    ladder = steps("bf16")
    flags = cumulative(ladder)
    ours = [set(" ".join(f[0]).replace("--dtype fp32", "dtype=fp32").replace("--dtype bf16", "dtype=bf16").split())
            for f in flags]
    assert flags[0][0] == ("--dtype", "fp32", "--attention", "math", "--unfused_projections")
    assert flags[1][0] == ("--attention", "math", "--unfused_projections", "--dtype", "bf16")
    assert flags[2][0] == ("--unfused_projections", "--dtype", "bf16")
    assert flags[3][0] == ("--dtype", "bf16")
    assert flags[-1][0] == ("--dtype", "bf16", "--channels_last", "--compile", "--compile_mode", "max-autotune",
                            "--int8")
    assert flags[3][1] == ("--dtype", "bf16", "--fuse_projections")
    assert flags[-1][1][-1] == "--int8" and "--attention" not in flags[-1][1]
    for before, after in zip(ours, ours[1:]):  # every step changes something, and only adds from step 2 on
        assert before != after
    # the table: speed-ups are step 0's seconds over each step's, ours/peer is the peer's seconds over ours
    summary = [{"batch": 1, "config": c, "mean_s": s} for c, s in
               [("S0", 8.0), ("H0", 10.0), ("S1", 4.0), ("H1", 5.0)]]
    rows = table(summary, ladder[:2], 1)
    assert rows[4].split("|")[3:8] == [" 8 ", " 1.00x ", " 10 ", " 1.00x ", " 1.25x "]
    assert rows[5].split("|")[3:8] == [" 4 ", " 2.00x ", " 5 ", " 2.00x ", " 1.25x "]


def test_ladder_configs_interleave_ours_and_peer():
    opt = benchmark.parse_args(["--random", "tiny", "--ladder", "--ladder_steps", "3"])
    configs, _ = benchmark.select_configs(opt)
    keys = [c.key for c in configs]
    if importlib.util.find_spec("diffusers"):
        assert keys == ["S0", "H0", "S1", "H1", "S2", "H2"]
        assert [c.peer for c in configs] == [False, True] * 3
    opt = benchmark.parse_args(["--random", "tiny", "--ladder", "--no_peer"])
    assert [c.key for c in benchmark.select_configs(opt)[0]] == [f"S{k}" for k in range(8)]


def test_ladder_only_runs_the_chosen_steps_with_every_earlier_flag(capsys):
    from ldm.benchmark.ladder import cumulative, steps
    opt = benchmark.parse_args(["--random", "tiny", "--ladder", "--no_peer", "--ladder_only", "6,2"])
    configs = benchmark.select_configs(opt)[0]
    full = cumulative(steps())
    assert [(c.key, tuple(c.flags)) for c in configs] == [("S2", full[2][0]), ("S6", full[6][0])]
    assert "--compile" in configs[1].flags and "--channels_last" in configs[1].flags  # steps 4 and 5 kept
    for bad in (["--ladder", "--ladder_only", "8"], ["--ladder", "--ladder_only", "x"],
                ["--ladder", "--ladder_steps", "3", "--ladder_only", "3"], ["--ladder_only", "1"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(["--random", "tiny", *bad])
        assert "--ladder_only" in capsys.readouterr().err


def test_compile_notes_compare_each_compiled_row_with_its_eager_counterpart():
    pytest.importorskip("diffusers")  # P and PC are dropped without the peer
    pytest.importorskip("transformers")
    from ldm.benchmark.runs import compile_notes, eager_counterpart
    ladder, _ = benchmark.select_configs(benchmark.parse_args(["--random", "tiny", "--ladder", "--no_peer"]))
    assert {c.key: eager_counterpart(c, ladder) for c in ladder[5:]} == {"S5": "S4", "S6": "S4", "S7": "S4"}
    blog, _ = benchmark.select_configs(benchmark.parse_args(["--random", "tiny", "--configs", "D,E,P,PC"]))
    assert [eager_counterpart(c, blog) for c in blog[1::2]] == ["D", "P"]
    rows = [{"config": k, "batch": 1, "status": "ok", "process_s": p, "seconds": s}
            for k, p, s in (("S4", 30.0, 10.0), ("S5", 100.0, 8.0), ("S6", 150.0, 6.0))]
    notes = compile_notes(rows, ladder)
    assert len(notes) == 2 and "untimed part of each process (load, warm-up iteration with compilation) 92.0 s" \
        in notes[0] and "72.0 s more than S4's" in notes[0] and "124.0 s more than S4's" in notes[1]


# ---- SD 1.x, SD 2.x 768-v and the inpainting UNet ----

def random_model(cache, name: str) -> tuple[str, str]:
    """(config, ckpt) of the harness's cached random checkpoint ``--random name``."""
    config, ckpt, _ = benchmark.prepare_model(benchmark.parse_args(["--random", name, "--cache_dir", str(cache)]))
    return config, ckpt


def test_peer_matches_ours_sd1_tiny(cache):
    """SD 1: diffusers' CLIPTextModel (quick-GELU, all layers, final LN) and its tokenizer (EOT padding) from
    the converted weights give our text context, latents and images from the same x_T."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import json
    import os
    from ldm.benchmark.export import cached_export, load_tokenizer
    from ldm.benchmark.peer import check
    from ldm.model.presets import load_config
    from ldm.model.clip import tokenize
    config, ckpt = random_model(cache, "sd1-tiny")
    weights = cached_export(config, ckpt, str(cache))
    with open(os.path.join(weights, "configs.json"), encoding="utf-8") as f:
        exported = json.load(f)
    text_cfg = load_config(config).text
    assert exported["text_encoder"]["hidden_act"] == "quick_gelu"
    assert exported["text_encoder"]["num_hidden_layers"] == text_cfg.layers  # no layer dropped, unlike SD 2
    assert exported["unet"]["cross_attention_dim"] == 64 and exported["unet"]["use_linear_projection"] is False
    assert exported["unet"]["attention_head_dim"] == [2, 2]  # num_heads: 2, diffusers' legacy name
    tok = load_tokenizer(weights, exported["tokenizer"])
    for prompt in ["A photo", "a painting of a fox, by Hokusai & friends!!", ""]:
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids == tokenize(prompt)[0].tolist()
        assert ids[-1] == 49407  # padded with <|endoftext|>, not "!" (0) as SD 2
    errors = check(config, ckpt, weights, steps=4, size=64)
    # measured: text 0, latents 2.3e-6, images 1.5e-6 (fp32 CPU)
    assert errors["text"] < 1e-5 and errors["latents"] < 1e-4 and errors["images"] < 1e-4, errors


def test_peer_matches_ours_sd2_v_tiny(cache):
    """SD 2 768-v: the peer's PLMS turns each call's v into eps as ours does (diffusers' own v_prediction PNDM
    would combine v's across steps: 0.29 apart after 4 steps)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from ldm.benchmark.export import cached_export
    from ldm.benchmark.peer import check
    config, ckpt = random_model(cache, "tiny-v")
    errors = check(config, ckpt, cached_export(config, ckpt, str(cache)), steps=4, size=64)
    # measured: text 0, latents 6.2e-6, images 6.9e-6 (fp32 CPU)
    assert errors["text"] < 1e-5 and errors["latents"] < 1e-4 and errors["images"] < 1e-4, errors


def test_v_to_eps_closed_form():
    """x_t = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0 give back eps, at each call's t."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffusers import PNDMScheduler
    from ldm.benchmark.peer import v_to_eps
    sched = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in (1, 500, 999):
        a = sched.alphas_cumprod[t]
        x_t, v = a.sqrt() * x0 + (1 - a).sqrt() * eps, a.sqrt() * eps - (1 - a).sqrt() * x0
        torch.testing.assert_close(v_to_eps(sched, v, torch.tensor(t), x_t), eps, atol=1e-5, rtol=1e-5)


def test_unet_microbenchmark_inpainting_tiny(cache, tmp_path):
    """9-channel inputs for the inpainting UNet, ours and the peer's: both UNets give the same eps on them."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import json
    from ldm.benchmark import unet as benchmark_unet
    from ldm.benchmark.export import cached_export
    config, ckpt = random_model(cache, "tiny-inpainting")
    weights = cached_export(config, ckpt, str(cache))
    ours, _ = benchmark_unet.parse_args(["--config", config, "--ckpt", ckpt, "--stats", "x"])
    peer, _ = benchmark_unet.parse_args(["--peer", "--weights", weights, "--stats", "x"])
    out = {}
    for name, opt in (("ours", ours), ("peer", peer)):
        assert benchmark_unet.unet_factory(opt)[2] == (9, 64)  # (in_channels, context width)
        unet = benchmark_unet.load_unet(opt, torch.device("cpu"), torch.float32)
        x, t, c = benchmark_unet.inputs(2, 8, 8, (9, 64), "cpu", torch.float32)
        assert x.shape == (2, 9, 8, 8) and c.shape == (2, 77, 64)
        with torch.no_grad():
            out[name] = benchmark_unet.unet_factory(opt)[1](unet, x, t, c)
    assert out["ours"].shape == (2, 4, 8, 8)
    assert (out["ours"] - out["peer"]).abs().max() / out["peer"].abs().max() < 1e-5  # measured ~1e-7
    for name, src in (("ours", ["--config", config, "--ckpt", ckpt]), ("peer", ["--peer", "--weights", weights])):
        stats = tmp_path / f"{name}.json"
        assert benchmark_unet.main([*src, "--H", "64", "--W", "64", "--iters", "2", "--device", "cpu",
                                    "--fit", "none", "--stats", str(stats)]) == 0
        st = json.loads(stats.read_text())
        assert st["iters"] == 2 and st["s_mean"] > 0 and st["est_bytes"] > 0


def test_unet_microbenchmark_ladder_flags_keep_the_output(cache):
    """The ladder's UNet flags, ours and the peer's, applied by benchmark_unet.apply_flags: each takes effect and
    leaves eps within 1e-5 of the plain fp32 UNet (re-randomised weights); the profiler names real ops."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffusers.models.attention_processor import AttnProcessor
    from ldm.benchmark import unet as benchmark_unet
    from ldm.model.attention import CrossAttention
    from ldm.benchmark.export import cached_export
    config, ckpt = random_model(cache, "tiny")
    weights = cached_export(config, ckpt, str(cache))
    src = {"ours": ["--config", config, "--ckpt", ckpt], "peer": ["--peer", "--weights", weights]}
    flag_sets = {"ours": [["--attention", "math", "--unfused_projections"], ["--unfused_projections"], [],
                          ["--channels_last"]],
                 "peer": [["--attention", "math"], [], ["--fuse_projections"], ["--fuse_projections", "--channels_last"]]}
    x, t, c = benchmark_unet.inputs(2, 8, 8, (4, 64), "cpu", torch.float32)
    ref = None
    for side in ("ours", "peer"):
        for flags in flag_sets[side]:
            opt, _ = benchmark_unet.parse_args([*src[side], "--stats", "x", *flags])
            unet = benchmark_unet.apply_flags(benchmark_unet.load_unet(opt, torch.device("cpu"), torch.float32), opt)
            convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
            assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs) == \
                ("--channels_last" in flags)
            if side == "ours":
                attn = [m for m in unet.modules() if isinstance(m, CrossAttention)]
                assert attn and all(m.fused == ("--unfused_projections" not in flags) for m in attn)
            else:
                procs = list(unet.attn_processors.values())
                assert all(isinstance(p, AttnProcessor) for p in procs) == ("--attention" in flags)
                fused = [m.fused_projections for m in unet.modules() if hasattr(m, "fused_projections")]
                assert fused and all(f == ("--fuse_projections" in flags) for f in fused)
            with torch.no_grad():
                eps = benchmark_unet.unet_factory(opt)[1](unet, x, t, c).float()
            ref = eps if ref is None else ref
            assert (eps - ref).abs().max() / ref.abs().max() < 1e-5, (side, flags)
    step = lambda: benchmark_unet.unet_factory(opt)[1](unet, x, t, c)
    with torch.no_grad():
        top = benchmark_unet.profile_call(step, torch.device("cpu"), 5)
    assert len(top) == 5 and all(a["self_ms"] >= b["self_ms"] for a, b in zip(top, top[1:]))
    assert 0 < sum(p["share"] for p in top) <= 1 + 1e-9 and all(p["calls"] >= 1 for p in top)
    assert any("conv" in p["op"] for p in top) and all(p["op"].startswith("aten::") for p in top)


def test_harness_ladder_unet_only(tmp_path, cache):
    """--ladder --repeats 0: no end-to-end runs, the UNet microbenchmark of each step, ours and the peer's, its
    ladder table (speed-ups = ratios of the CSV's means) and the profiler tables."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    assert benchmark.main(["--random", "tiny", "--cache_dir", str(cache), "--device", "cpu", "--H", "64", "--W", "64",
                           "--repeats", "0", "--ladder", "--ladder_steps", "2", "--unet_iters", "1",
                           "--unet_profile", "3", "--threads", "1", "--outdir", str(out), "--name", "t"]) == 0
    _, runs = read_csv(str(out / "t-runs.csv"))
    _, unet = read_csv(str(out / "t-unet.csv"))
    assert runs == [] and [u["config"] for u in unet] == ["S0", "H0", "S1", "H1"]
    assert {u["status"] for u in unet} == {"ok"} and all(u["fit_method"] == "" for u in unet)  # no memory search
    ms = {u["config"]: float(u["ms_mean"]) for u in unet}
    text = (out / "t.md").read_text()
    assert "### Technique ladder, batch size" not in text  # no end-to-end table without runs
    row = next(line for line in text.splitlines() if line.startswith("| 1 | + bf16"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == f"{ms['S0'] / ms['S1']:.2f}x" and cells[6] == f"{ms['H1'] / ms['S1']:.2f}x"
    assert text.count("#### Where the time goes:") == 4 and "`aten::" in text


def test_ckpt_without_config_is_guessed(cache, capsys):
    """--ckpt alone: the config comes from ldm.weights.detect.guess_config, and the guess is printed."""
    import os
    _, ckpt = random_model(cache, "sd1-tiny")
    capsys.readouterr()
    config, got, name = benchmark.prepare_model(benchmark.parse_args(["--ckpt", ckpt]))
    assert got == ckpt and name == "random-sd1-tiny-seed0-native_mha"
    assert os.path.samefile(config, os.path.join(ROOT, "configs", "tiny", "v1-tiny.yaml"))
    assert "detected tiny SD1-shaped test model" in capsys.readouterr().err
    _, ckpt_v = random_model(cache, "tiny-v")
    config, _, _ = benchmark.prepare_model(benchmark.parse_args(["--ckpt", ckpt_v]))
    assert os.path.basename(config) == "v2-tiny-v.yaml"  # the weights cannot tell eps from v: v assumed, said so
    assert "assumed v-prediction" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="checkpoint not found"):
        benchmark.prepare_model(benchmark.parse_args(["--ckpt", str(cache / "missing.ckpt")]))
    with pytest.raises(SystemExit):
        benchmark.parse_args([])


def test_harness_inpainting_tiny_unet_only(tmp_path, cache):
    """An inpainting model: no end-to-end runs (txt2img cannot run it), the UNet microbenchmark for ours and P."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    prefix = harness(tmp_path, cache, "D,P", "--fit", "none", model="tiny-inpainting")
    _, runs = read_csv(prefix + "-runs.csv")
    assert runs == []
    _, unet = read_csv(prefix + "-unet.csv")
    assert [u["config"] for u in unet] == ["D", "P"] and {u["status"] for u in unet} == {"ok"}
    assert all(float(u["ms_mean"]) > 0 for u in unet)
    with open(prefix + ".md", encoding="utf-8") as f:
        assert "inpainting model: the end-to-end runs and the peer check are skipped" in f.read()


@pytest.mark.slow
def test_harness_sd1_tiny_end_to_end(tmp_path, cache):
    """--random sd1-tiny through the whole harness, peer check included (about 2 minutes on a shared CPU)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    prefix = harness(tmp_path, cache, "A,C,D,P", "--check", model="sd1-tiny")
    check_outputs(prefix, ["A", "C", "D", "P"], repeats=1)
    with open(prefix + ".md", encoding="utf-8") as f:
        text = f.read()
    latents = float(re.search(r"latents (\S+),", text).group(1))
    assert "## random-sd1-tiny" in text and latents < 1e-4
