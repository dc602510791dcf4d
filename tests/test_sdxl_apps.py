"""SDXL in the scripts: txt2img (--demo sdxl, a random tiny checkpoint in the released layout picked by detection,
the refiner stage and the ensemble of experts), img2img on base and refiner, the random SDXL checkpoints, and
one-line errors for bad input."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from helpers import script_main
from ldm.apps.random_checkpoint import make_random_checkpoint
from ldm.model.presets import from_name
from ldm.weights.layout import to_original
from ldm.weights.loading import model_class

COMMON = ["--n_iter", "1", "--n_samples", "1", "--steps", "3", "--device", "cpu", "--H", "64", "--W", "64"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny SDXL base and refiner, seeded random, fp16 safetensors in the released layout; and a tiny SD 2."""
    d = tmp_path_factory.mktemp("sdxl-ckpts")
    out = {}
    for name, preset in (("base", "sdxl-tiny"), ("refiner", "sdxl-refiner-tiny"), ("sd2", "tiny")):
        out[name] = str(d / f"{name}.safetensors")
        make_random_checkpoint(out[name], from_name(preset), seed=1, dtype="fp16", progress=False)
    return out


def parameters(folder: str) -> str:
    return Image.open(os.path.join(folder, "samples", "00000.png")).info["parameters"]


def test_random_sdxl_checkpoint_has_the_released_key_set(ckpts):
    with torch.device("meta"):
        model = model_class(from_name("sdxl-tiny"))(from_name("sdxl-tiny"))
    expected = set(to_original(model.state_dict()))
    with safe_open(ckpts["base"], "pt") as f:
        keys = set(f.keys())
        assert keys == expected and "denoiser.sigmas" in keys
        assert f.get_slice("model.diffusion_model.label_emb.0.0.weight").get_dtype() == "F16"
        assert f.get_slice("denoiser.sigmas").get_dtype() == "F32"  # a schedule table stays float32


def test_txt2img_demo_sdxl_names_the_model(tmp_path, capsys):
    assert script_main("txt2img")(["--demo", "sdxl", "--outdir", str(tmp_path), *COMMON[:-4]]) == 0
    text = parameters(str(tmp_path))
    assert "Model: demo-sdxl-tiny-random" in text and "Sampler: Euler," in text and "CFG scale: 5.0" in text
    assert "Size: 64x64" in text and "Original size: 64x64, Crop: 0,0, Target size: 64x64" in text


def test_txt2img_sdxl_checkpoint_alone_then_refiner(ckpts, tmp_path, capsys):
    """--ckpt alone picks the config from the keys; the refiner stage (img2img on the base's latents) and the
    ensemble of experts (--denoising_end) both write images, named in the PNG parameters."""
    txt2img = script_main("txt2img")
    out = str(tmp_path / "base")
    assert txt2img(["--ckpt", ckpts["base"], "--outdir", out, "--original_size", "96", "80", "--crop", "8", "4",
                    *COMMON]) == 0
    assert "detected tiny SDXL" in capsys.readouterr().err
    assert "Model: base, Original size: 80x96, Crop: 8,4, Target size: 64x64" in parameters(out)
    for extra, field in ((["--refiner_strength", "0.3"], "Refiner strength: 0.3"),
                         (["--denoising_end", "0.7", "--sampler", "dpmpp_2m"], "Denoising end: 0.7")):
        out = str(tmp_path / field.split(":")[0].replace(" ", "_"))
        assert txt2img(["--ckpt", ckpts["base"], "--refiner_ckpt", ckpts["refiner"], "--outdir", out, *extra,
                        *COMMON]) == 0
        text = parameters(out)
        assert "Model: base + refiner" in text and field in text, text


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_img2img_takes_sdxl_base_and_refiner(ckpts, tmp_path, which, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 30, 60)).save(init)
    out = str(tmp_path / "out")
    args = ["--ckpt", ckpts[which], "--init-img", str(init), "--outdir", out, "--strength", "0.5",
            "--ddim_steps", "4", "--n_samples", "1", "--device", "cpu"]
    assert script_main("img2img")(args) == 0
    assert f"Model: {which}," in parameters(out) and "Sampler: Euler," in parameters(out)


def error_of(script: str, args: list[str], capsys) -> str:
    assert script_main(script)(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_bad_input_is_one_line(ckpts, tmp_path, capsys):
    base, refiner, sd2 = ckpts["base"], ckpts["refiner"], ckpts["sd2"]
    out = ["--outdir", str(tmp_path)]
    sdxl_yaml = os.path.join(os.path.dirname(__file__), "..", "configs", "sdxl", "sd_xl_base.yaml")
    sd2_yaml = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny", "v2-tiny.yaml")
    cases = {
        "refiner as base": (["--ckpt", refiner, *out, *COMMON], "is the SDXL refiner"),
        "base as refiner": (["--ckpt", base, "--refiner_ckpt", base, *out, *COMMON], "is not an SDXL refiner"),
        "SD 2 with the SDXL yaml": (["--ckpt", sd2, "--config", sdxl_yaml, *out, *COMMON], "SD"),
        "SDXL with an SD 2 yaml": (["--ckpt", base, "--config", sd2_yaml, *out, *COMMON], "SDXL"),
        "size": (["--ckpt", base, *out, *COMMON[:-4], "--H", "60", "--W", "64"], "multiple of 8"),
        "SDXL flag on SD 2": (["--ckpt", sd2, "--crop", "4", "4", *out, *COMMON], "--crop is an SDXL flag"),
        "denoising_end alone": (["--ckpt", base, "--denoising_end", "0.8", *out, *COMMON], "needs --refiner_ckpt"),
        "denoising_end with DDIM": (["--ckpt", base, "--refiner_ckpt", refiner, "--denoising_end", "0.8",
                                     "--sampler", "ddim", *out, *COMMON], "--sampler euler"),
    }
    for name, (args, words) in cases.items():
        line = error_of("txt2img", args, capsys)
        assert line.startswith("error: ") and words in line and len(line) < 400, (name, line)
