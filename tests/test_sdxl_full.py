"""Full-size SDXL on the CPU (slow): txt2img on a random base checkpoint in the released layout (fp16 safetensors,
6.9 GB, picked by detection alone), then the refiner on the base's image (img2img, as the reference refines). One
full-size checkpoint on disk at a time, deleted when done; each run's peak RSS stays within one fp32 copy's size
(never two)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT
from helpers import need_disk
from ldm.apps.random_checkpoint import make_random_checkpoint
from ldm.model.presets import from_name

GB = 1e9
COMMON = ["--n_samples", "1", "--n_iter", "1", "--device", "cpu", "--dtype", "bf16", "--seed", "3"]


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", f"{name}.py"), *args], capture_output=True,
                       text=True, env=env, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def children_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1e3 / GB  # Linux: kB


def parameter_count(preset: str) -> int:
    import torch
    from ldm.weights.loading import model_class
    cfg = from_name(preset)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_full_size_sdxl_base_then_refiner_on_the_cpu(tmp_path):
    need_disk(tmp_path, 8.0)
    ckpt = tmp_path / "sd_xl_base_1.0.safetensors"
    make_random_checkpoint(str(ckpt), from_name("sdxl-base"), seed=0, dtype="fp16", progress=False)
    n = parameter_count("sdxl-base")
    assert abs(os.path.getsize(ckpt) - 2 * n) < 0.01 * 2 * n  # fp16: 2 bytes a parameter, ~6.9 GB
    out = tmp_path / "base"
    p = script("txt2img", "--ckpt", str(ckpt), "--H", "256", "--W", "256", "--steps", "2", "--outdir", str(out),
               *COMMON)
    assert "detected SDXL base" in p.stderr
    os.remove(ckpt)  # one full-size checkpoint on disk at a time
    fp32 = 4 * n / GB
    # measured 14.5 GB: the fp16 file's mmap'd pages (6.9 GB, file-backed, counted in RSS) and the bf16 weights
    # (6.9 GB): one fp32 copy's worth at most, never two
    assert children_peak_gb() < 1.15 * fp32, (children_peak_gb(), fp32)
    png = out / "samples" / "00000.png"
    image = Image.open(png)
    assert image.size == (256, 256) and "Model: sd_xl_base_1.0" in image.info["parameters"]
    assert "Sampler: Euler" in image.info["parameters"]

    refiner = tmp_path / "sd_xl_refiner_1.0.safetensors"
    make_random_checkpoint(str(refiner), from_name("sdxl-refiner"), seed=0, dtype="fp16", progress=False)
    out = tmp_path / "refined"
    p = script("img2img", "--ckpt", str(refiner), "--init-img", str(png), "--strength", "0.5", "--ddim_steps", "2",
               "--outdir", str(out), *COMMON)
    os.remove(refiner)
    assert "detected SDXL refiner" in p.stderr
    refined = Image.open(out / "samples" / "00000.png")
    assert refined.size == (256, 256) and "Model: sd_xl_refiner_1.0" in refined.info["parameters"]
    assert children_peak_gb() < 1.15 * fp32
