"""Where we differ from the original on purpose: one test per line of the README's "Differences from the original".

Each test shows both sides: the original's behaviour, written here from what Stability-AI/stablediffusion's code
does (never imported, never copied), and ours. The last test reads the README section and checks that every
line names a test of this file that exists.
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, build
from ldm.samplers.api import DDIMSampler, LDMSampler, PLMSSampler
from ldm.samplers.guidance import CFGDenoiser
from ldm.samplers.plms import sample_plms
from ldm.samplers.timesteps import ddim_schedule, ddim_timesteps
from test_samplers import ALPHA_BAR, T, GaussianData, ToyModel, inputs, rel, run_ours

README = os.path.join(ROOT, "README.md")
SECTION = "## Differences from the original"


@pytest.fixture()
def grad_restored():
    """The scripts' mains switch grad mode off for the process; put it back for the next test."""
    yield
    torch.set_grad_enabled(True)


# ----- the original's pieces, written from what its code does -----

def original_ddim_timesteps(S: int) -> np.ndarray:
    """make_ddim_timesteps("uniform"): every multiple of T // S below T, plus one (ascending)."""
    return np.asarray(list(range(0, T, T // S))) + 1


def guided(model, x, t, c, uc, scale):
    """The original samplers' get_model_output: one [uncond, cond] batch, the guided raw model output."""
    out_u, out_c = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uc, c])).chunk(2)
    return out_u + scale * (out_c - out_u)


def original_plms(model, S, x, c, uc, scale):
    """The original PLMSSampler: the guided output is used as e_t as it is, v model or not (no conversion)."""
    steps = original_ddim_timesteps(S)
    ab = model.alphas_cumprod  # float32 buffers, as the original's make_schedule reads them
    a, a_prev = ab[steps], torch.cat([ab[:1], ab[steps[:-1]]])
    b, time_range, old_eps = x.shape[0], np.flip(steps), []

    def x_prev(x, e_t, index):
        pred_x0 = (x - (1 - a[index]).sqrt() * e_t) / a[index].sqrt()
        return a_prev[index].sqrt() * pred_x0 + (1 - a_prev[index]).sqrt() * e_t

    for i, t in enumerate(time_range):
        index = S - i - 1
        ts = torch.full((b,), int(t), dtype=torch.long)
        e_t = guided(model, x, ts, c, uc, scale)
        if not old_eps:
            t_next = torch.full((b,), int(time_range[min(i + 1, S - 1)]), dtype=torch.long)
            e_prime = (e_t + guided(model, x_prev(x, e_t, index), t_next, c, uc, scale)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        old_eps = (old_eps + [e_t])[-3:]
        x = x_prev(x, e_prime, index)
    return x


def original_ddim_down_from(model, x, c, uc, scale, S, top_index):
    """The original DDIM loop (eta 0, eps model) from table index ``top_index`` down to 0: sample() runs it from
    S - 1, decode(t_start) from t_start - 1."""
    steps = original_ddim_timesteps(S)
    ab = model.alphas_cumprod
    a, a_prev = ab[steps], torch.cat([ab[:1], ab[steps[:-1]]])
    for index in range(top_index, -1, -1):
        e_t = guided(model, x, torch.full((x.shape[0],), int(steps[index]), dtype=torch.long), c, uc, scale)
        pred_x0 = (x - (1 - a[index]).sqrt() * e_t) / a[index].sqrt()
        x = a_prev[index].sqrt() * pred_x0 + (1 - a_prev[index]).sqrt() * e_t
    return x


# ----- the items -----

@pytest.mark.parametrize("S", [2, 5, 10])
def test_plms_on_v_models_converts_v_to_eps(S):
    # The original's PLMS on a v model: our PLMS fed the raw v (the denoiser with its conversion switched off).
    x, c, uc = inputs(torch.float64)
    toy = ToyModel("v")
    raw = CFGDenoiser(toy, c, uc, 4.0)
    raw.v = False
    fed_v = sample_plms(raw, x, ddim_schedule(ALPHA_BAR.tolist(), S), progress=False)
    assert rel(fed_v, original_plms(toy, S, x, c, uc, 4.0)) <= 1e-5
    # Ours: eps = alpha * v + sigma * x, exact on Gaussian data, so PLMS on the v model is PLMS on its eps twin.
    v_model, eps_model = ToyModel("v", GaussianData(0.5, "v")), ToyModel("eps", GaussianData(0.5, "eps"))
    t, alpha, sigma = torch.full((1,), 500.0), ALPHA_BAR[500] ** 0.5, (1 - ALPHA_BAR[500]) ** 0.5
    eps_of_v = CFGDenoiser(v_model, c, uc, 4.0)(x, t, alpha, sigma)
    assert rel(eps_of_v, CFGDenoiser(eps_model, c, uc, 4.0)(x, t, alpha, sigma)) <= 1e-12
    ours = run_ours("plms", v_model, S, x, c, uc, 4.0)
    assert rel(ours, run_ours("plms", eps_model, S, x, c, uc, 4.0)) <= 1e-9
    assert rel(original_plms(v_model, S, x, c, uc, 4.0), ours) > 0.3  # the original's v-PLMS is another picture


def test_same_seed_draws_other_start_noise(monkeypatch, tmp_path, grad_restored):
    """Original: seed_everything(seed), build the model (every layer's init draws from the global RNG), then
    x_T = torch.randn(shape) from the global RNG. Ours: x_T from torch.Generator().manual_seed(seed)."""
    from ldm.apps import txt2img
    seen, real = [], LDMSampler.sample

    def sample(self, *args, **kwargs):
        seen.append(kwargs["x_T"].clone())
        return real(self, *args, **kwargs)
    monkeypatch.setattr(LDMSampler, "sample", sample)
    argv = ["--demo", "--prompt", "a cat", "--n_iter", "1", "--n_samples", "1", "--steps", "1", "--seed", "42",
            "--outdir", str(tmp_path), "--device", "cpu"]
    assert txt2img.main(argv) == 0
    ours = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(42))
    assert len(seen) == 1 and torch.equal(seen[0], ours)
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    torch.manual_seed(42)
    instantiate_from_config(OmegaConf.load(TINY).model)  # construction draws from the global RNG: randn moves on
    original = torch.randn(1, 4, 8, 8)
    assert (original - ours).abs().max() > 0.5
    torch.manual_seed(42)
    assert torch.equal(torch.randn(1, 4, 8, 8), ours)  # ours is what the original draws when nothing came between


def test_an_original_picture_from_its_start_noise(tiny_model):
    """Given the original's start noise, ours gives its picture: txt2img's x_T (the original's --fixed_code
    start_code, or its sampler's first randn) through sample(x_T=...); img2img from the global RNG state the
    original had after building its model, with generator=None (posterior sample, then stochastic_encode)."""
    model, S, scale = tiny_model, 4, 5.0
    with torch.no_grad():
        c, uc = model.get_learned_conditioning(["a cat"]), model.get_learned_conditioning([""])
        x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))  # as torch.save'd by the original
        ours, _ = DDIMSampler(model).sample(S=S, conditioning=c, batch_size=1, shape=[4, 8, 8], verbose=False,
                                            unconditional_guidance_scale=scale, unconditional_conditioning=uc,
                                            x_T=x_T)
        assert rel(ours, original_ddim_down_from(model, x_T, c, uc, scale, S, S - 1)) <= 1e-5

        from ldm.apps import pipelines
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
        strength, state = 0.5, torch.get_rng_state()
        t_enc = int(strength * S)
        # the original's img2img: scale * posterior sample (global randn), stochastic_encode (randn_like), decode
        posterior = model.encode_first_stage(image)
        z = model.scale_factor * (posterior.mean + posterior.std * torch.randn(posterior.mean.shape))
        a = model.alphas_cumprod[original_ddim_timesteps(S)]
        z_enc = a[t_enc].sqrt() * z + (1 - a[t_enc]).sqrt() * torch.randn_like(z)
        original = original_ddim_down_from(model, z_enc, c, uc, scale, S, t_enc - 1)
        torch.set_rng_state(state)
        init_latent = pipelines.encode_image(model, image)
        ours = pipelines.img2img(DDIMSampler(model), init_latent, c, uc, scale, S, strength, verbose=False)
        assert rel(ours, original) <= 1e-5


def test_steps_that_do_not_divide_1000_are_exactly_S():
    """Original: every multiple of 1000 // S, so S = 7 takes 8 steps and S = 3 reaches t = 1000, past the table."""
    assert len(original_ddim_timesteps(7)) == 8
    assert original_ddim_timesteps(3)[-1] == T
    with pytest.raises(IndexError):
        ALPHA_BAR[original_ddim_timesteps(3)]  # the original's make_ddim_sampling_parameters
    for S in (3, 7, 30):  # ours: its first S entries
        assert ddim_timesteps(S)[::-1] == list(original_ddim_timesteps(S)[:S])
    for S in (10, 50):  # S divides 1000: the same list
        assert ddim_timesteps(S)[::-1] == list(original_ddim_timesteps(S))
    x, c, uc = inputs()
    toy = ToyModel()
    run_ours("ddim", toy, 7, x, c, uc, 4.0)
    assert len(toy.calls) == 7 and max(float(t.max()) for _, t in toy.calls) < T


def test_dpm_solver_takes_one_step():
    """Original: DPM-Solver's multistep method asserts steps >= order (2), so S = 1 fails. Ours: one first-order
    step from t = 999 to t = 0, which is x0 predicted at the top re-noised to alpha_bar[0] (a DDIM step)."""
    def original_multistep(steps, order=2):
        assert steps >= order
    with pytest.raises(AssertionError):
        original_multistep(1)
    x, c, uc = inputs(torch.float64)
    toy = ToyModel()
    ours = run_ours("dpm", toy, 1, x, c, uc, 4.0)
    assert len(toy.calls) == 1 and float(toy.calls[0][1][0]) == pytest.approx(999.0)
    eps = guided(toy, x, torch.full((x.shape[0],), 999.0), c, uc, 4.0)
    a_top, a_end = ALPHA_BAR[-1], ALPHA_BAR[0]
    x0 = (x - (1 - a_top) ** 0.5 * eps) / a_top ** 0.5
    assert rel(ours, a_end ** 0.5 * x0 + (1 - a_end) ** 0.5 * eps) <= 1e-9


def test_img2img_strength_one_starts_from_the_top_step():
    """Original: stochastic_encode gathers sqrt(ddim_alphas)[t_enc] with t_enc = S, one past its S entries."""
    from ldm.apps import pipelines
    S = 5
    ab = torch.from_numpy(ALPHA_BAR).float()
    ddim_alphas = ab[original_ddim_timesteps(S)]
    with pytest.raises(RuntimeError):
        torch.sqrt(ddim_alphas).gather(-1, torch.tensor([int(1.0 * S)]))  # extract_into_tensor
    # ours: noised to the top step's level and denoised with all S steps, i.e. sampling from that x_T
    x0, c, uc = inputs()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    assert pipelines.strength_to_steps(1.0, S) == S
    ours = pipelines.img2img(DDIMSampler(ToyModel()), x0, c, uc, 4.0, S, 1.0, noise=noise, verbose=False)
    a_top = float(ddim_alphas[-1])
    x_T = a_top ** 0.5 * x0 + (1 - a_top) ** 0.5 * noise
    assert rel(ours, run_ours("ddim", ToyModel(), S, x_T, c, uc, 4.0)) <= 1e-5


def test_use_fp16_and_autocast_on_the_cpu(tiny_model):
    """Original: use_fp16 makes the UNet cast its input to fp16, which an fp32 conv on the CPU refuses; under
    CPU autocast the decoded images are bf16, which its .numpy() PNG writing refuses."""
    from ldm.apps import images, txt2img
    from ldm.apps.cli import setup
    from ldm.model.presets import load_config
    conv = torch.nn.Conv2d(4, 4, 3)
    with pytest.raises(RuntimeError):
        conv(torch.randn(1, 4, 8, 8).type(torch.float16))  # openaimodel's h = x.type(self.dtype)
    decoded = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with pytest.raises(TypeError):
        (255.0 * decoded.to(torch.bfloat16).cpu().numpy())
    # ours: use_fp16 is ignored (the UNet runs in its weights' dtype), --precision is full on the CPU by default,
    # and images become uint8 through fp32 whatever their dtype
    from omegaconf import OmegaConf
    yaml = OmegaConf.load(TINY)
    assert yaml.model.params.unet_config.params.use_fp16 is True
    fp16_cfg = load_config(yaml)
    yaml.model.params.unet_config.params.use_fp16 = False
    assert load_config(yaml) == fp16_cfg
    with torch.no_grad():  # the tiny yaml says use_fp16: True; its UNet runs in fp32, as its weights are
        out = tiny_model.model.diffusion_model(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 64))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert setup(txt2img.parse_args(["--device", "cpu"])).precision == "full"
    bf16 = decoded.to(torch.bfloat16)
    assert torch.equal(images.to_uint8(bf16), images.to_uint8(bf16.float()))


def test_nonfinite_images_are_refused(monkeypatch, tmp_path, grad_restored):
    """Original: clamp keeps NaN and the cast to uint8 writes a PNG anyway (black on x86). Ours: exit 1, nothing
    written (unless --keep_nonfinite)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy: invalid value encountered in cast
        x = torch.clamp((torch.full((3, 8, 8), float("nan")) + 1.0) / 2.0, min=0.0, max=1.0)
        assert torch.isnan(x).all()
        Image.fromarray((255.0 * x.permute(1, 2, 0).numpy()).astype(np.uint8)).save(tmp_path / "original.png")
    assert (tmp_path / "original.png").is_file()
    from ldm.apps import txt2img
    from test_finite import _nan_model
    main = _nan_model(monkeypatch, txt2img, "model.diffusion_model")
    out = tmp_path / "ours"
    argv = ["--demo", "--prompt", "a cat", "--n_iter", "1", "--n_samples", "1", "--steps", "2",
            "--outdir", str(out), "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 1
    assert list(out.rglob("*.png")) == []


def test_16bit_images_are_scaled(tmp_path):
    """Original: Image.open(path).convert("RGB") clips 16-bit pixels at 255 (nearly white). Ours: v16 / 65535."""
    from ldm.apps.pipelines import load_init_image
    v8 = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    Image.fromarray(v8.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(v8).convert("RGB").save(tmp_path / "eight.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode == "I;16"
        original = np.asarray(img.convert("RGB"))
    assert (original == 255).mean() > 0.99
    assert torch.equal(load_init_image(str(tmp_path / "deep.png")), load_init_image(str(tmp_path / "eight.png")))


def test_loading_is_strict(tmp_path):
    """Original scripts: load_state_dict(sd, strict=False), silent about missing keys (they keep their random
    init). Ours: load_model raises naming them; the original API's load_state_dict(strict=False) warns."""
    from ldm.weights.loading import load_model
    from ldm.weights.reading import CheckpointError
    model = build(TINY, seed=1)
    sd = {k: v for k, v in model.state_dict().items() if k != "model.diffusion_model.out.2.bias"}
    result = torch.nn.Module.load_state_dict(model, sd, strict=False)  # what the original scripts do
    assert result.missing_keys == ["model.diffusion_model.out.2.bias"]
    torch.save({"state_dict": sd}, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"missing key\(s\): model\.diffusion_model\.out\.2\.bias"):
        load_model(TINY, tmp_path / "missing.ckpt")
    with pytest.warns(UserWarning, match=r"ignored 1 missing key\(s\): model\.diffusion_model\.out\.2\.bias"):
        model.load_state_dict(sd, strict=False)


def test_no_cuda_defaults(tiny_model):
    """Original: DDIMSampler/PLMSSampler(model, device=torch.device("cuda")) move their tables there, so the
    original code fails on a CPU-only machine (its text encoders default to device="cuda" too). Ours: the model's
    device, tables as Python floats; the text encoder follows its weights."""
    original_default = torch.device("cuda")
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1).to(original_default)  # register_buffer's attr.to(self.device)
    for cls in (DDIMSampler, PLMSSampler):
        sampler = cls(tiny_model)
        assert sampler.device == tiny_model.device == torch.device("cpu")
        sampler.make_schedule(4, verbose=False)
        assert all(isinstance(a, float) for a in sampler.ddim_schedule.alpha)
    with torch.no_grad():  # the text encoder: the tokens go to its weights' device
        assert tiny_model.get_learned_conditioning(["a cat"]).device == torch.device("cpu")


def test_missing_conditioning_key_is_crossattn():
    """Original LatentDiffusion: conditioning_key=None with concat_mode=True means "concat". Ours: "crossattn"."""
    from omegaconf import OmegaConf
    from ldm.model.presets import load_config

    def original_conditioning_key(conditioning_key=None, concat_mode=True):
        return conditioning_key if conditioning_key is not None else ("concat" if concat_mode else "crossattn")
    assert original_conditioning_key() == "concat"
    yaml = OmegaConf.load(TINY)
    del yaml.model.params["conditioning_key"]
    assert load_config(yaml).conditioning_key == "crossattn"


def test_pngs_carry_no_watermark_and_the_parameters(tmp_path):
    """Original: put_watermark (invisible-watermark's DWT-DCT, "SDV2") changes every image's pixels; not
    reproducible here without that package. Ours: the decoded pixels exactly, and the parameters text chunk."""
    from ldm.apps import images
    img = (torch.rand(16, 24, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    images.save_png(images.to_pil(img), str(tmp_path / "a.png"), "a cat\nSteps: 2")
    with Image.open(tmp_path / "a.png") as png:
        assert torch.equal(torch.from_numpy(np.asarray(png.convert("RGB")).copy()), img)
        assert png.text["parameters"] == "a cat\nSteps: 2"


# ----- the README section names only tests that exist -----

def readme_items() -> list[str]:
    """The bullet lines of the README's "Differences from the original" section."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    items, current = [], None
    for line in body.splitlines():
        if line.startswith("* "):
            current = line[2:]
            items.append(current)
        elif current is not None and line.startswith("  "):
            items[-1] += " " + line.strip()
        else:
            current = None
    return items


def test_readme_names_a_test_on_every_line():
    import ast
    with open(__file__, encoding="utf-8") as f:
        defined = {n.name for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)}
    items = readme_items()
    assert len(items) >= 8
    for item in items:
        named = re.findall(r"tests/test_(\w+)\.py::(\w+)", item)
        assert named, f"this README line names no test: {item[:80]!r}"
        for module, name in named:
            if module == "differences":
                assert name in defined, f"README names tests/test_differences.py::{name}, which does not exist"
            else:
                path = os.path.join(ROOT, "tests", f"test_{module}.py")
                assert os.path.isfile(path), f"README names {path}, which does not exist"
                with open(path, encoding="utf-8") as f:
                    assert re.search(rf"^def {name}\(", f.read(), re.M), f"README names {module}::{name}"
