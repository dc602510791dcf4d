"""Inpainting: the 9-channel UNet vs diffusers, hybrid conditioning and CFG vs diffusers' UNet fed the way its
StableDiffusionInpaintPipeline feeds it (cat([x, mask, masked-image latents])), the pipeline's mask and latent
inputs vs closed forms, loading, config checks, and scripts/inpaint.py end to end."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, build
from helpers import rel_err, script_main
from ldm.apps import pipelines
from ldm.model.presets import load_config
from ldm.weights.loading import load_model
from ldm.model.diffusion import inpaint_config
from ldm.models.diffusion.ddpm import LatentDiffusion, LatentInpaintDiffusion
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.samplers.guidance import CFGDenoiser

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TINY_INPAINT = os.path.join(ROOT, "configs", "tiny", "v2-tiny-inpainting.yaml")
SD2_INPAINT = os.path.join(ROOT, "configs", "stable-diffusion", "v2-inpainting-inference.yaml")
SCRIPT = os.path.join(ROOT, "scripts", "inpaint.py")
TOL = 1e-4  # max|ours - diffusers| / max|diffusers|, fp32


@pytest.fixture(scope="module")
def model():
    return build(TINY_INPAINT, seed=3)


@pytest.fixture(scope="module")
def theirs(model):
    from test_img2img import diffusers_unet
    return diffusers_unet(model.model.diffusion_model)


def hybrid_inputs(model, seed: int = 0):
    """x (2, 4, 8, 6), c_concat (2, 5, 8, 6) = [mask, masked latent], cond and uncond contexts (2, 77, 64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 6, generator=g)
    mask = (torch.rand(2, 1, 8, 6, generator=g) > 0.5).float()
    c_concat = torch.cat([mask, torch.randn(2, 4, 8, 6, generator=g)], 1)
    c = model.get_learned_conditioning(["a red sofa", "a cat"])
    uc = model.get_learned_conditioning(["", ""])
    return x, c_concat, c, uc


# ----- the 9-channel UNet -----
@pytest.mark.parametrize("mode", ["plain", "small_norm_inputs"])
def test_tiny_inpainting_unet_matches_diffusers(mode, record_property):
    from test_parity_unet import build_pair, compare, inputs
    ours, theirs_ = build_pair(load_config(TINY_INPAINT).unet, seed=1)
    assert ours.cfg.in_channels == 9 and theirs_.config.in_channels == 9
    rel = compare(ours, theirs_, *inputs(ours.cfg, 8, 12), mode)
    record_property("rel_err", rel)
    assert rel <= TOL, rel


@pytest.mark.slow
def test_full_sd2_inpainting_unet_matches_diffusers(record_property):
    from test_parity_unet import build_pair, compare, inputs
    pair = list(build_pair(load_config(SD2_INPAINT).unet, seed=1))
    rel = compare(*pair, *inputs(pair[0].cfg, 16, 24), "plain")
    pair.clear()
    gc.collect()
    record_property("rel_err", rel)
    assert rel <= TOL, rel


# ----- hybrid conditioning and guidance -----
def test_hybrid_apply_model_is_diffusers_unet_on_concatenated_channels(model, theirs):
    x, c_concat, c, _ = hybrid_inputs(model)
    t = torch.tensor([10, 700])
    got = model.apply_model(x, t, {"c_concat": [c_concat], "c_crossattn": [c]})
    with torch.no_grad():
        want = theirs(torch.cat([x, c_concat], 1), t, encoder_hidden_states=c).sample
    assert rel_err(got, want) <= TOL
    # c_concat split into parts concatenates the same way
    got_split = model.apply_model(x, t, {"c_concat": [c_concat[:, :1], c_concat[:, 1:]], "c_crossattn": [c]})
    assert rel_err(got_split, want) <= 1e-6
    with pytest.raises(ValueError, match="c_concat"):
        model.apply_model(x, t, c)


def test_guided_step_is_cfg_with_shared_c_concat(model, theirs):
    """eps = eps(x, c_concat, "") + s (eps(x, c_concat, prompt) - eps(x, c_concat, "")), each half on its own."""
    x, c_concat, c, uc = hybrid_inputs(model, seed=1)
    scale = 7.5
    denoise = CFGDenoiser(model, {"c_concat": [c_concat], "c_crossattn": [c]},
                          {"c_concat": [c_concat], "c_crossattn": [uc]}, scale)
    got = denoise(x, torch.tensor([500.0]), 0.5, 0.8)
    xc, t = torch.cat([x, c_concat], 1), torch.tensor([500, 500])
    with torch.no_grad():
        eps_u = theirs(xc, t, encoder_hidden_states=uc).sample
        eps_c = theirs(xc, t, encoder_hidden_states=c).sample
    assert rel_err(got, eps_u + scale * (eps_c - eps_u)) <= TOL
    with pytest.raises(ValueError, match="c_concat"):
        CFGDenoiser(model, {"c_concat": [c_concat], "c_crossattn": [c]}, uc, scale)


def test_inpainting_ddim_sampling_matches_diffusers_loop(model, theirs):
    """DDIM with CFG over the hybrid model vs diffusers' DDIMScheduler stepping its UNet on [x, mask, latents]."""
    from test_samplers import diffusers_scheduler
    x_T, c_concat, c, uc = hybrid_inputs(model, seed=2)
    S, scale = 4, 6.0
    ours = pipelines.inpaint(DDIMSampler(model), c_concat, c, uc, scale, S, x_T=x_T, verbose=False)
    sched = diffusers_scheduler("ddim", "eps")
    sched.set_timesteps(S)
    x = x_T
    with torch.no_grad():
        for t in sched.timesteps:
            xc = torch.cat([x, c_concat], 1)
            out_u, out_c = theirs(torch.cat([xc, xc]), t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
            x = sched.step(out_u + scale * (out_c - out_u), t, x).prev_sample
    assert rel_err(ours, x) <= TOL


# ----- the pipeline's inputs -----
def test_mask_threshold_and_masked_image():
    gray = np.array([[0, 127, 128, 255]], dtype=np.uint8).repeat(2, 0)  # 127/255 < 0.5 <= 128/255
    rgb = np.full((2, 4, 3), 200, dtype=np.uint8)
    inputs = pipelines.make_inpaint_inputs(Image.fromarray(rgb), Image.fromarray(gray))
    assert inputs.mask[0, 0].tolist() == [[0.0, 0.0, 1.0, 1.0]] * 2
    keep = 200 / 255 * 2 - 1
    assert torch.allclose(inputs.masked_image[0, :, 0], torch.tensor([keep, keep, 0.0, 0.0]).expand(3, 4), atol=1e-6)
    assert torch.allclose(inputs.image[0, :, 0], torch.full((3, 4), keep), atol=1e-6)
    with pytest.raises(ValueError, match="same size"):
        pipelines.make_inpaint_inputs(Image.fromarray(rgb), Image.fromarray(gray[:1]))


def test_inpaint_conditioning_is_mask_then_masked_latent(model):
    """c_concat = [mask downsampled by 8 (nearest: every 8th pixel), 0.18215 * posterior sample of the masked image]."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 48, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 64, 48)
    mask[..., 10:40, 5:30] = 1
    inputs = pipelines.InpaintInputs(image, mask, image * (mask < 0.5))
    cc = pipelines.inpaint_conditioning(model, inputs, 2, torch.Generator().manual_seed(4))
    assert cc.shape == (2, 5, 8, 6)
    assert torch.equal(cc[:, :1], mask[..., ::8, ::8].expand(2, -1, -1, -1))
    posterior = model.first_stage_model.encode(inputs.masked_image.expand(2, -1, -1, -1))
    noise = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(4))
    want = 0.18215 * (posterior.mean + torch.exp(0.5 * posterior.logvar) * noise)
    assert rel_err(cc[:, 1:], want) <= 1e-6


def test_inputs_from_files(tmp_path):
    rng = np.random.default_rng(0)
    rgb = (rng.random((70, 135, 3)) * 255).astype(np.uint8)
    gray = (rng.random((70, 135)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "image.png")
    Image.fromarray(gray).save(tmp_path / "mask.png")
    Image.fromarray(gray[:64]).save(tmp_path / "small-mask.png")
    inputs = pipelines.load_inpaint_inputs(str(tmp_path / "image.png"), str(tmp_path / "mask.png"))
    ref = np.asarray(Image.fromarray(gray).resize((128, 64), resample=Image.LANCZOS)) / 255.0 >= 0.5
    assert inputs.image.shape == (1, 3, 64, 128) and inputs.mask.shape == (1, 1, 64, 128)
    assert np.array_equal(inputs.mask[0, 0].numpy() == 1, ref)
    with pytest.raises(ValueError, match="the mask is 135x64 but the image is 135x70"):
        pipelines.load_inpaint_inputs(str(tmp_path / "image.png"), str(tmp_path / "small-mask.png"))
    with pytest.raises(FileNotFoundError, match="mask not found"):
        pipelines.load_inpaint_inputs(str(tmp_path / "image.png"), str(tmp_path / "none.png"))


# ----- configs and loading -----
def test_configs():
    cfg = load_config(SD2_INPAINT)
    assert (cfg.conditioning_key, cfg.concat_keys, cfg.masked_image_key) == ("hybrid", ("mask", "masked_image"),
                                                                           "masked_image")
    assert (cfg.unet.in_channels, cfg.unet.out_channels, cfg.unet.context_dim) == (9, 4, 1024)
    assert load_config(SD2_INPAINT.replace(".yaml", "_native_mha.yaml")).checkpoint_layout == "native_mha"
    from omegaconf import OmegaConf
    params = OmegaConf.to_container(OmegaConf.load(TINY_INPAINT).model.params)
    for change, message in ((dict(conditioning_key="crossattn"), "only 'hybrid'"),
                            (dict(concat_keys=["mask", "image"]), "masked_image_key"),
                            (dict(bogus=1), "unknown config key")):
        with pytest.raises(ValueError, match=message):
            inpaint_config({**params, **change})
    params["unet_config"]["params"]["in_channels"] = 4
    with pytest.raises(ValueError, match="in_channels=9"):
        inpaint_config(params)


@pytest.mark.parametrize("layout", ["original", "native_mha"])
def test_random_checkpoint_loads_strictly(tmp_path, layout):
    from ldm.apps.random_checkpoint import make_random_checkpoint
    path = str(tmp_path / "tiny-inpaint.safetensors")
    make_random_checkpoint(path, TINY_INPAINT, layout=layout, seed=2, progress=False)
    loaded, _ = load_model(TINY_INPAINT, path)
    assert type(loaded) is LatentInpaintDiffusion and loaded.model.conditioning_key == "hybrid"
    assert loaded.concat_keys == ("mask", "masked_image")
    assert loaded.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 9
    assert type(load_model(TINY, _tiny_txt2img(tmp_path))[0]) is LatentDiffusion


def _tiny_txt2img(tmp_path) -> str:
    from safetensors.torch import save_file
    path = str(tmp_path / "tiny.safetensors")
    save_file({k: v.contiguous() for k, v in build(TINY).state_dict().items()}, path)
    return path


# ----- scripts/inpaint.py -----
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inpaint")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in build(TINY_INPAINT, seed=5).state_dict().items()}, str(d / "m.safetensors"))
    rng = np.random.default_rng(2)
    Image.fromarray((rng.random((64, 100, 3)) * 255).astype(np.uint8)).save(d / "image.png")
    mask = np.zeros((64, 100), dtype=np.uint8)
    mask[8:40, 16:64] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[:, :64]).save(d / "mask-64.png")
    (d / "text.png").write_text("not an image")
    return {"ckpt": str(d / "m.safetensors"), "image": str(d / "image.png"), "mask": str(d / "mask.png"),
            "mask-64": str(d / "mask-64.png"), "text": str(d / "text.png"), "none": str(d / "none.png")}


def test_cli_end_to_end(files, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, SCRIPT, "--prompt", "a red sofa", "--image", files["image"], "--mask",
                        files["mask"], "--steps", "3", "--n_samples", "2", "--seed", "2", "--config", TINY_INPAINT,
                        "--ckpt", files["ckpt"], "--outdir", str(out), "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Sampled 2 images" in p.stdout
    files_out = sorted(os.listdir(out / "samples"))
    assert files_out == ["00000.png", "00001.png"]
    img = Image.open(out / "samples" / files_out[0])
    assert img.size == (64, 64) and img.mode == "RGB"
    for field in ("a red sofa\n", "Steps: 3", "Sampler: DDIM", "CFG scale: 10.0", "Seed: 2", "Mask: mask.png"):
        assert field in img.text["parameters"], field


@pytest.fixture
def in_process():
    """Call scripts/inpaint.py's main() here (bad inputs fail before any sampling); restore grad mode after."""
    yield script_main("inpaint")
    torch.set_grad_enabled(True)


@pytest.mark.parametrize("change,message", [
    ({"--mask": None}, "--mask is required"),
    ({"--mask": "none"}, "mask not found"),
    ({"--image": "none"}, "image not found"),
    ({"--mask": "mask-64"}, "the mask is 64x64 but the image is 100x64; they must be the same size"),
    ({"--mask": "text"}, "is not a readable image"),
    ({"--config": TINY, "--ckpt": "TXT2IMG"}, "not an inpainting model"),
])
def test_cli_bad_inputs(in_process, files, tmp_path, capsys, change, message):
    args = {"--image": files["image"], "--mask": files["mask"], "--config": TINY_INPAINT, "--ckpt": files["ckpt"]}
    for flag, value in change.items():
        args[flag] = _tiny_txt2img(tmp_path) if value == "TXT2IMG" else files.get(value, value)
    out = tmp_path / "out"
    argv = [x for flag, value in args.items() if value is not None for x in (flag, value)]
    code = in_process(argv + ["--steps", "2", "--outdir", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err, err
    assert not out.exists()


def test_demo_uses_the_tiny_inpainting_model(in_process, files, tmp_path, capsys):
    out = tmp_path / "out"
    code = in_process(["--demo", "--image", files["image"], "--mask", files["mask"], "--steps", "1", "--scale", "1",
                       "--outdir", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert os.listdir(out / "samples") == ["00000.png"]


def test_compiled_unet_is_never_recompiled(model):
    """Inpainting over one compiled UNet (the c_concat is joined outside it): samplers and scales on one graph."""
    from ldm.models.diffusion.dpm_solver import DPMSolverSampler
    from ldm.models.diffusion.plms import PLMSSampler
    graphs = []
    unet = model.model.diffusion_model
    torch._dynamo.reset()
    model.model.diffusion_model = torch.compile(unet, fullgraph=True,
                                                backend=lambda gm, ex: graphs.append(gm) or gm.forward)
    x_T, c_concat, c, uc = hybrid_inputs(model, seed=3)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for cls, scale in [(DDIMSampler, 7.5), (PLMSSampler, 1.0), (DPMSolverSampler, 3.0)]:
                out = pipelines.inpaint(cls(model), c_concat, c, uc, scale, 3, x_T=x_T, verbose=False)
                assert torch.isfinite(out).all()
    finally:
        model.model.diffusion_model = unet
        torch._dynamo.reset()
    assert len(graphs) == 1
