"""img2img: stochastic_encode vs the closed form, partway sampling vs diffusers' schedulers, the tiny model's
whole img2img vs a diffusers UNet + DDIMScheduler loop, input images, and scripts/img2img.py end to end.

The original's DDIM img2img (scripts/img2img.py): t_enc = int(strength * S); ``stochastic_encode`` noises x0
to ddim_timesteps[t_enc] (ascending) and ``decode`` runs the t_enc steps ddim_timesteps[t_enc - 1] ... [0].
In diffusers' terms (S dividing T, "leading" spacing, steps_offset=1, set_alpha_to_one=False): add_noise at
timesteps[S - t_enc - 1], then step through timesteps[S - t_enc:]. Strength 1 (t_enc = S, past the
original's table) noises to the top step, timesteps[0].
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, build
from helpers import script_main
from test_samplers import ALPHA_BAR, T, GaussianData, ToyModel, diffusers_scheduler, flow_map, rel, toy_net
from ldm.apps import pipelines
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TINY_INPAINT = os.path.join(ROOT, "configs", "tiny", "v2-tiny-inpainting.yaml")
SCRIPT = os.path.join(ROOT, "scripts", "img2img.py")


def toy_inputs(seed: int = 0):
    """x0 (2, 4, 3, 5), noise, cond and uncond contexts (2, 77, 8)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 4, 3, 5, generator=g)
    noise = torch.randn(2, 4, 3, 5, generator=g)
    c = torch.randn(2, 77, 8, generator=g) + torch.tensor([-1.0, 1.0]).view(-1, 1, 1)
    return x0, noise, c, torch.zeros_like(c)


# ----- stochastic_encode: q(x_t | x0) in closed form -----
@pytest.mark.parametrize("S", [10, 7])
def test_ddim_stochastic_encode_is_the_closed_form(S):
    x0, noise, _, _ = toy_inputs()
    sampler = DDIMSampler(ToyModel())
    sampler.make_schedule(ddim_num_steps=S, verbose=False)
    ascending = [1 + i * (T // S) for i in range(S)]  # the original's ddim_timesteps
    for idx in ([0, 0], [3, S - 1], [S, S]):  # index S (strength 1) is the top step
        t = torch.tensor(idx)
        got = sampler.stochastic_encode(x0, t, noise=noise)
        ab = torch.tensor([ALPHA_BAR[ascending[min(i, S - 1)]] for i in idx], dtype=torch.float64).view(-1, 1, 1, 1)
        want = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
        assert rel(got, want) <= 1e-6, idx
    # use_original_steps: t is a training timestep
    got = sampler.stochastic_encode(x0, torch.tensor([0, 999]), use_original_steps=True, noise=noise)
    ab = torch.tensor([ALPHA_BAR[0], ALPHA_BAR[999]], dtype=torch.float64).view(-1, 1, 1, 1)
    assert rel(got, ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()) <= 1e-6
    with pytest.raises(ValueError, match="outside"):
        sampler.stochastic_encode(x0, torch.tensor([S + 1, 0]), noise=noise)


def test_dpm_stochastic_encode_levels():
    """DPM index t is the point decode(t) starts from: timestep (T - 1) t / S (integers for S = 9)."""
    x0, noise, _, _ = toy_inputs()
    sampler = DPMSolverSampler(ToyModel())
    sampler.make_schedule(ddim_num_steps=9, verbose=False)
    for t in (0, 4, 9):
        got = sampler.stochastic_encode(x0, t, noise=noise)
        ab = ALPHA_BAR[111 * t]
        assert rel(got, math.sqrt(ab) * x0.double() + math.sqrt(1 - ab) * noise.double()) <= 1e-6, t


def test_stochastic_encode_noise_comes_from_the_generator():
    x0, _, _, _ = toy_inputs()
    sampler = DDIMSampler(ToyModel())
    sampler.make_schedule(ddim_num_steps=5, verbose=False)
    a = sampler.stochastic_encode(x0, 3, generator=torch.Generator().manual_seed(1))
    b = sampler.stochastic_encode(x0, 3, noise=torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
    c = sampler.stochastic_encode(x0, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(RuntimeError, match="make_schedule"):
        DDIMSampler(ToyModel()).stochastic_encode(x0, 0)


# ----- partway sampling vs diffusers -----
def ours_img2img(cls, S, strength, eta, x0, noise, c, uc, scale, seed=0):
    model = ToyModel()
    out = pipelines.img2img(cls(model), x0, c, uc, scale, S, strength, eta,
                            torch.Generator().manual_seed(seed), noise=noise, verbose=False)
    return out, model


def guided_toy(x, t, c, uc, scale):
    tt = torch.full((2 * x.shape[0],), float(t))
    out_u, out_c = toy_net(torch.cat([x, x]), tt, torch.cat([uc, c])).chunk(2)
    return out_u + scale * (out_c - out_u)


@pytest.mark.parametrize("strength,eta", [(0.3, 0.0), (0.75, 0.0), (1.0, 0.0), (0.75, 0.6), (0.0, 0.0)])
def test_ddim_img2img_matches_diffusers(strength, eta):
    S, scale = 10, 5.0
    x0, noise, c, uc = toy_inputs()
    ours, model = ours_img2img(DDIMSampler, S, strength, eta, x0, noise, c, uc, scale, seed=3)
    sched = diffusers_scheduler("ddim", "eps")
    sched.set_timesteps(S)
    t_enc = int(strength * S)
    start = max(S - t_enc - 1, 0)  # the original noises one step above where it starts denoising
    x = sched.add_noise(x0, noise, sched.timesteps[start:start + 1])
    g = torch.Generator().manual_seed(3)
    for t in sched.timesteps[S - t_enc:]:
        x = sched.step(guided_toy(x, t, c, uc, scale), t, x, eta=eta, generator=g).prev_sample
    assert rel(ours, x) <= 1e-5
    assert [float(t[0]) for _, t in model.calls] == [float(t) for t in sched.timesteps[S - t_enc:]]


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_dpm_img2img_matches_diffusers(strength):
    """DPM-Solver++(2M) from point S - t_enc: first-order first step, as diffusers' img2img (S = 9 divides T - 1)."""
    S, scale = 9, 4.0
    x0, noise, c, uc = toy_inputs(1)
    ours, _ = ours_img2img(DPMSolverSampler, S, strength, 0.0, x0, noise, c, uc, scale)
    sched = diffusers_scheduler("dpm", "eps")
    sched.set_timesteps(S)
    t_enc = int(strength * S)
    begin = S - t_enc
    n = int(sched.timesteps[begin])  # = 111 * t_enc
    x = math.sqrt(ALPHA_BAR[n]) * x0 + math.sqrt(1 - ALPHA_BAR[n]) * noise
    sched.set_begin_index(begin)
    for t in sched.timesteps[begin:]:
        x = sched.step(guided_toy(x, t, c, uc, scale), t, x).prev_sample
    assert rel(ours, x) <= 1e-4


def test_plms_img2img_runs_the_tail_of_its_schedule():
    """PLMS partway: the last t_enc timesteps, its extra first-step call at the next one down."""
    x0, noise, c, uc = toy_inputs()
    out, model = ours_img2img(PLMSSampler, 10, 0.5, 0.0, x0, noise, c, uc, 3.0)
    assert [int(t[0]) for _, t in model.calls] == [401, 301, 301, 201, 101, 1]
    assert torch.isfinite(out).all()


def test_decode_with_original_steps_is_exact_for_a_point_mass():
    """eta = 0 DDIM over training steps t_start - 1 ... 0 ends on alpha_bar = 1: exactly the data point."""
    x, _, c, uc = toy_inputs()
    x = x.double()
    model = ToyModel(net=GaussianData(0.0))
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=10, verbose=False)
    steps = []
    out = sampler.decode(x, c.double(), 3, unconditional_guidance_scale=2.0, unconditional_conditioning=uc.double(),
                         use_original_steps=True, callback=steps.append, verbose=False)
    mu = 2.0 * c.double().mean(dim=(1, 2)).view(-1, 1, 1, 1)
    assert steps == [0, 1, 2] and [int(t[0]) for _, t in model.calls] == [2, 1, 0]
    assert rel(out, flow_map(x, mu, 0.0, ALPHA_BAR[2], 1.0)) <= 1e-6


def test_strength_to_steps():
    assert [pipelines.strength_to_steps(s, 50) for s in (0.0, 0.3, 0.75, 1.0)] == [0, 15, 37, 50]
    for bad in (-0.01, 1.01):
        with pytest.raises(ValueError, match="strength"):
            pipelines.strength_to_steps(bad, 50)


# ----- the tiny model's whole img2img vs diffusers' UNet and DDIMScheduler -----
def diffusers_unet(unet):
    """diffusers' UNet2DConditionModel holding ``unet``'s weights, mapped by diffusers' own converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from helpers import load_on_meta
    from ldm.weights.layout import to_original
    from test_parity_unet import diffusers_config
    config = diffusers_config(unet.cfg)
    original = {f"model.diffusion_model.{k}": v for k, v in to_original(unet.state_dict()).items()}
    return load_on_meta(lambda: UNet2DConditionModel(**config), convert_ldm_unet_checkpoint(original, config))


def test_tiny_img2img_matches_diffusers_loop(tiny_model):
    model, S, strength, scale = tiny_model, 5, 0.6, 7.5
    theirs = diffusers_unet(model.model.diffusion_model)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 48, generator=g) * 2 - 1
    init = pipelines.encode_image(model, image.expand(2, -1, -1, -1), torch.Generator().manual_seed(1))
    noise = torch.randn(init.shape, generator=g)
    c = model.get_learned_conditioning(["a cat", "a dog"])
    uc = model.get_learned_conditioning(["", ""])
    ours = pipelines.img2img(DDIMSampler(model), init, c, uc, scale, S, strength, noise=noise, verbose=False)

    sched = diffusers_scheduler("ddim", "eps")
    sched.set_timesteps(S)
    t_enc = int(strength * S)
    x = sched.add_noise(init, noise, sched.timesteps[S - t_enc - 1:S - t_enc])
    with torch.no_grad():
        for t in sched.timesteps[S - t_enc:]:
            out_u, out_c = theirs(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
            x = sched.step(out_u + scale * (out_c - out_u), t, x).prev_sample
    assert rel(ours, x) <= 1e-4


# ----- input images -----
def test_init_image_is_shrunk_to_multiples_of_64_like_the_original(tmp_path):
    rng = np.random.default_rng(0)
    pixels = (rng.random((70, 135, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    x = pipelines.load_init_image(str(tmp_path / "a.png"))
    ref = np.asarray(Image.fromarray(pixels).resize((128, 64), resample=Image.LANCZOS), dtype=np.float64)
    assert x.shape == (1, 3, 64, 128) and x.dtype == torch.float32
    assert np.abs(x[0].permute(1, 2, 0).double().numpy() - (ref / 127.5 - 1)).max() <= 1e-6
    Image.fromarray(pixels[:50, :50]).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="at least 64"):
        pipelines.load_init_image(str(tmp_path / "small.png"))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        pipelines.load_init_image(str(tmp_path / "text.png"))
    with pytest.raises(FileNotFoundError, match="not found"):
        pipelines.load_init_image(str(tmp_path / "missing.png"))


# ----- scripts/img2img.py -----
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.safetensors")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in build(TINY, seed=5).state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def init_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "init.png"
    Image.fromarray((np.random.default_rng(1).random((64, 100, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def run_script(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=900)


def test_cli_end_to_end(tiny_ckpt, init_png, tmp_path):
    out = tmp_path / "out"
    p = run_script("--prompt", "a photo", "--init-img", init_png, "--strength", "0.5", "--ddim_steps", "4",
                   "--n_samples", "2", "--seed", "3", "--config", TINY, "--ckpt", tiny_ckpt, "--outdir", str(out),
                   "--device", "cpu", "--time_file", str(tmp_path / "t.txt"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Sampled 2 images" in p.stdout and "target t_enc is 2 of 4 steps" in p.stderr
    files = sorted(os.listdir(out / "samples"))
    assert files == ["00000.png", "00001.png"] and float((tmp_path / "t.txt").read_text()) > 0
    img = Image.open(out / "samples" / files[0])
    assert img.size == (64, 64) and img.mode == "RGB"  # 100 -> 64: shrunk to a multiple of 64
    for field in ("a photo\n", "Steps: 4", "Sampler: DDIM", "Denoising strength: 0.5", "Seed: 3", "Size: 64x64"):
        assert field in img.text["parameters"], field
    assert Image.open(out / "grid-0000.png").size == (2 + 2 * 66, 2 + 66)


@pytest.fixture
def in_process():
    """Call scripts/img2img.py's main() here (bad inputs fail before any model work); restore grad mode after."""
    yield script_main("img2img")
    torch.set_grad_enabled(True)


@pytest.mark.parametrize("flags,message", [
    (["--strength", "1.5"], "--strength 1.5 must be in [0, 1]"),
    (["--strength", "-0.2"], "--strength -0.2 must be in [0, 1]"),
    (["--init-img", "MISSING"], "init image not found"),
    (["--init-img", "TEXT"], "is not a readable image"),
    (["--init-img", ""], "--init-img is required"),
    (["--config", TINY_INPAINT, "--ckpt", "INPAINT"], "img2img needs a text-to-image model"),
])
def test_cli_bad_inputs(in_process, init_png, tmp_path, capsys, flags, message):
    text = tmp_path / "text.png"
    text.write_text("not an image")
    inpaint_ckpt = tmp_path / "inpaint.safetensors"
    if "INPAINT" in flags:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in build(TINY_INPAINT).state_dict().items()}, str(inpaint_ckpt))
    sub = {"MISSING": str(tmp_path / "nope.png"), "TEXT": str(text), "INPAINT": str(inpaint_ckpt)}
    out = tmp_path / "out"
    argv = ["--init-img", init_png, "--demo", "--ddim_steps", "2", "--outdir", str(out), "--device", "cpu"]
    if "INPAINT" in flags:
        argv.remove("--demo")
    code = in_process(argv + [sub.get(f, f) for f in flags])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err, err
    assert not out.exists()  # no output folder, no file


def test_compiled_unet_is_never_recompiled_across_strengths(tiny_model):
    """img2img over one compiled UNet: every sampler, strengths and scales (1.0 included) on one graph."""
    graphs = []
    unet = tiny_model.model.diffusion_model
    torch._dynamo.reset()
    tiny_model.model.diffusion_model = torch.compile(unet, fullgraph=True,
                                                     backend=lambda gm, ex: graphs.append(gm) or gm.forward)
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    c = tiny_model.get_learned_conditioning(["a cat", "a dog"])
    uc = tiny_model.get_learned_conditioning(["", ""])
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for cls, strength, scale in [(DDIMSampler, 0.5, 7.5), (PLMSSampler, 0.8, 1.0), (DPMSolverSampler, 1.0, 3.0)]:
                out = pipelines.img2img(cls(tiny_model), init, c, uc, scale, 4, strength,
                                        generator=torch.Generator().manual_seed(1), verbose=False)
                assert torch.isfinite(out).all()
    finally:
        tiny_model.model.diffusion_model = unet
        torch._dynamo.reset()
    assert len(graphs) == 1


@pytest.mark.gpu
def test_decode_never_syncs_with_the_host():
    model = build(TINY).cuda()
    c = model.get_learned_conditioning(["a cat"] * 2)
    uc = model.get_learned_conditioning([""] * 2)
    init = torch.randn(2, 4, 8, 8, device="cuda")
    for cls, eta in [(DDIMSampler, 0.5), (PLMSSampler, 0.0), (DPMSolverSampler, 0.0)]:
        sampler = cls(model)
        sampler.make_schedule(ddim_num_steps=4, ddim_eta=eta, verbose=False)
        g = torch.Generator(device="cuda").manual_seed(0)
        z = sampler.stochastic_encode(init, torch.tensor([3, 3]), generator=g)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            x = sampler.decode(z, c, 3, unconditional_guidance_scale=7.5, unconditional_conditioning=uc,
                               generator=g, verbose=False, callback=lambda i: None)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert x.device.type == "cuda" and torch.isfinite(x).all()


def test_encode_image_follows_offloaded_vae():
    """With model offload the UNet (model.device) may sit on the CPU while the VAE runs on the device: the
    image must go where the VAE's weights are (the meta device stands in for a GPU here)."""
    from conftest import TINY, build
    from ldm.apps import pipelines
    from ldm.speed.offload import enable_model_offload
    model = build(TINY)
    handle = enable_model_offload(model, "meta")
    z = pipelines.encode_image(model, torch.zeros(1, 3, 64, 64), torch.Generator().manual_seed(0))
    assert z.device.type == "meta" and z.shape == (1, 4, 8, 8) and handle.active == "vae"
