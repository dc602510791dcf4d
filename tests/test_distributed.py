"""Data-parallel generation (ldm.apps.distributed): torchrun with 2 CPU ranks (gloo, one thread each) against one
process with --seed_per_item, a rank that fails on purpose, two independent writers of one --outdir, the
throughput mode of ldm-benchmark."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from ldm.apps import distributed, images
from ldm.fileio import atomic_write

SCRIPT = os.path.join(ROOT, "scripts", "txt2img.py")
TINY = ["--demo", "--device", "cpu", "--steps", "2", "--H", "64", "--W", "64", "--n_samples", "2", "--n_iter", "2"]
LIMIT = 90  # seconds a failing job may take, start to exit, on a busy 2-core machine (it takes ~10 s)

# rank 1 fails on purpose: in its first batch (the loop), before its model loads (a prompt file it cannot read),
# or killed outright; started by torchrun in place of scripts/txt2img.py
FAILING = """
import os, signal, sys
sys.path.insert(0, {root!r})
from ldm.apps import txt2img
mode = {mode!r}
if os.environ["RANK"] == "1":
    if mode == "prompts":
        def read_prompts(opt):
            raise txt2img.UserError("prompt file prompts.txt is not UTF-8 text")
        txt2img.read_prompts = read_prompts
    else:
        real = txt2img.sample_and_save
        def sample_and_save(opt, batches, gen, noise, generate, *rest):
            def broken(prompts, start):
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("rank one breaks on purpose")
            return real(opt, batches, gen, noise, broken, *rest)
        txt2img.sample_and_save = sample_and_save
sys.exit(txt2img.main())
"""


def env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def torchrun(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)


def pngs(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(".png")) if os.path.isdir(folder) else []


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_two_ranks_write_the_files_of_one_process_pixel_for_pixel(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na red bird\n")  # batches of 2 and 1: 4 work items of uneven size over 2 ranks
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):  # an earlier image: numbering starts after it, as rank 0 finds and shares
        (out / "samples").mkdir(parents=True)
        images.save_png(Image.new("RGB", (8, 8)), str(out / "samples" / "00003.png"))
    flags = [*TINY, "--from-file", str(prompts), "--seed", "5"]
    p1 = subprocess.run([sys.executable, SCRIPT, *flags, "--seed_per_item", "--outdir", str(one)],
                        capture_output=True, text=True, env=env(), timeout=300)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = torchrun(SCRIPT, *flags, "--outdir", str(two), "--time_file", str(tmp_path / "time.txt"))
    assert p2.returncode == 0, p2.stderr[-3000:]

    expected = ["00003.png"] + [f"{i:05}.png" for i in range(4, 10)]  # 3 prompts x 2 iterations
    assert pngs(one / "samples") == pngs(two / "samples") == expected
    for name in expected[1:]:
        a, b = Image.open(one / "samples" / name), Image.open(two / "samples" / name)
        assert np.array_equal(pixels(a.filename), pixels(b.filename)), name
        assert a.text["parameters"] == b.text["parameters"]  # prompt, iteration, batch position, item seed
    assert "Item seed: 5," in Image.open(two / "samples" / "00004.png").text["parameters"] + ","
    assert pngs(one) == pngs(two) == ["grid-0000.png"]  # written once, by rank 0
    assert np.array_equal(pixels(one / "grid-0000.png"), pixels(two / "grid-0000.png"))
    assert p2.stdout.count("Sampled ") == 1 and "Sampled 6 images" in p2.stdout and "on 2 ranks" in p2.stdout
    assert float((tmp_path / "time.txt").read_text()) > 0
    assert "DDIM:" not in p2.stderr and "images: 100%" in p2.stderr  # one bar over the job, no per-step bars


def test_without_the_flag_one_process_keeps_one_generator(tmp_path):
    """A plain run is today's: image 1 differs from its --seed_per_item twin (its noise follows image 0's)."""
    runs = {}
    for name, extra in (("plain", []), ("item", ["--seed_per_item"])):
        p = subprocess.run([sys.executable, SCRIPT, *TINY, "--n_iter", "1", "--outdir", str(tmp_path / name), *extra],
                           capture_output=True, text=True, env=env(), timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = [pixels(tmp_path / name / "samples" / f"0000{i}.png") for i in range(2)]
    assert np.array_equal(runs["plain"][0], runs["item"][0])  # seed + 0 is the seed: the first image agrees
    assert not np.array_equal(runs["plain"][1], runs["item"][1])


@pytest.mark.parametrize("mode,cause", [("generate", "RuntimeError: rank one breaks on purpose"),
                                        ("prompts", "prompt file prompts.txt is not UTF-8 text")])
def test_a_failing_rank_ends_the_job_with_one_line(tmp_path, mode, cause):
    script = tmp_path / "failing.py"
    script.write_text(FAILING.format(root=ROOT, mode=mode))
    out = tmp_path / "out"
    t0 = time.perf_counter()
    p = torchrun(str(script), *TINY, "--outdir", str(out), timeout=LIMIT)
    took = time.perf_counter() - t0
    assert p.returncode != 0 and took < LIMIT
    ours = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and ours[0].startswith(f"error: rank 1 of 2 failed: {cause}"), ours
    assert os.path.join(ROOT, "ldm") not in p.stderr  # no traceback of ours (torchrun prints its own summary)
    assert pngs(out) == []  # no grid
    assert not [f for d, _, fs in os.walk(tmp_path) for f in fs if ".partial-" in f]


def test_a_killed_rank_ends_the_job(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING.format(root=ROOT, mode="kill"))
    t0 = time.perf_counter()
    p = torchrun(str(script), *TINY, "--outdir", str(tmp_path / "out"), timeout=LIMIT)
    assert p.returncode != 0 and time.perf_counter() - t0 < LIMIT
    assert "exitcode  : -9" in p.stderr and "rank      : 1" in p.stderr  # torchrun names the killed rank


def test_a_flag_error_on_every_rank_is_said_once(tmp_path):
    p = torchrun(SCRIPT, *TINY, "--steps", "0", "--outdir", str(tmp_path / "out"), timeout=LIMIT)
    ours = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and ours == ["error: --steps must be at least 1 (on every rank)"]


def test_two_independent_processes_share_an_outdir(tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, SCRIPT, *TINY, "--n_iter", "3", "--prompt", prompt, "--outdir", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
             for prompt in ("a cat", "a dog")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    files = pngs(out / "samples")
    assert files == [f"{i:05}.png" for i in range(12)]  # 2 processes x 3 iterations x 2 images, none overwritten
    made = sorted((im.text["parameters"].split("\n")[0], im.text["parameters"].split("Iteration: ")[1].split(",")[0],
                   im.text["parameters"].split("Batch pos: ")[1].split(",")[0])
                  for im in (Image.open(out / "samples" / f) for f in files))
    assert made == sorted((p, str(it), str(pos)) for p in ("a cat", "a dog") for it in range(3) for pos in range(2))
    assert pngs(out) == ["grid-0000.png", "grid-0001.png"]


def test_a_claimed_name_is_never_overwritten(tmp_path):
    path = tmp_path / "00000.png"
    atomic_write(str(path), lambda f, _tmp: f.write(b"first"), replace=False)
    with pytest.raises(FileExistsError):
        atomic_write(str(path), lambda f, _tmp: f.write(b"second"), replace=False)
    assert path.read_bytes() == b"first" and os.listdir(tmp_path) == ["00000.png"]  # no partial file left
    (tmp_path / "00001.png").write_bytes(b"taken")
    saved, number = images.save_new_png(Image.new("RGB", (4, 4)), str(tmp_path), 0)
    assert number == 2 and saved == str(tmp_path / "00002.png")
    assert (tmp_path / "00001.png").read_bytes() == b"taken"


def test_failure_line_names_the_rank_or_says_every_rank():
    assert distributed.failure_line([(1, "out of memory")], 4) == "rank 1 of 4 failed: out of memory"
    assert distributed.failure_line([(0, "x"), (1, "x")], 2) == "x (on every rank)"
    assert distributed.failure_line([(2, "a"), (3, "b")], 4) == "rank 2 of 4 failed: a; 1 more rank(s) failed too"
    assert distributed.item_seed(2**64 - 1, 1) == 0


def test_outside_torchrun_the_job_is_one_rank():
    with distributed.job(None) as job:
        assert (job.rank, job.world_size, job.launched, job.step_bars) == (0, 1, False, True)
        assert job.share(7) == 7 and job.shard(3) == [0, 1, 2]
        with pytest.raises(KeyError):
            job.agree(KeyError("the caller's own error, unchanged"))


def test_benchmark_throughput_over_one_and_two_ranks(tmp_path):
    cmd = [sys.executable, "-m", "ldm.benchmark.harness", "--throughput", "2", "--random", "tiny", "--device", "cpu",
           "--H", "64", "--W", "64", "--steps", "2", "--n_iter", "4", "--threads", "1", "--repeats", "1",
           "--cache_dir", str(tmp_path / "cache"), "--outdir", str(tmp_path / "bench"), "--name", "t"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = (tmp_path / "bench" / "t-throughput.csv").read_text().splitlines()
    assert rows[0].startswith("config,flags,ranks,repeat,status,images,seconds,images_per_s")
    assert [r.split(",")[2] for r in rows[1:]] == ["1", "2"] and all(",ok,4," in r for r in rows[1:])
    md = (tmp_path / "bench" / "t-throughput.md").read_text()
    assert "| D | 1 | 4 |" in md and "| D | 2 | 4 |" in md and "100%" in md and "scaling efficiency" in md
