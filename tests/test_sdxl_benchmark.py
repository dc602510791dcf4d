"""The benchmark's SDXL peer: our tiny SDXL checkpoint exported for diffusers (ldm.benchmark.export_sdxl) is the
same model with the same sampler (PLMS from the same noise, the empty negative prompt zeroed on both sides), and
the UNet microbenchmark feeds both UNets the vector conditioning."""

from __future__ import annotations

import argparse

import torch

from helpers import rel_err
from ldm.apps.random_checkpoint import make_random_checkpoint
from ldm.benchmark.export import export
from ldm.benchmark.peer import build_pipeline, generate
from ldm.benchmark.unet import unet_factory
from ldm.model.conditioner import conditioning_batch
from ldm.model.presets import PRESETS, config_file, from_name
from ldm.models.diffusion.plms import PLMSSampler
from ldm.weights.loading import load_model


@torch.no_grad()
def test_sdxl_peer_is_the_same_model_and_sampler(tmp_path):
    ckpt, weights = str(tmp_path / "xl.safetensors"), str(tmp_path / "export")
    config = config_file(PRESETS["sdxl-tiny"].yaml)
    make_random_checkpoint(ckpt, from_name("sdxl-tiny"), seed=2, progress=False)
    export(config, ckpt, weights)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    model, _ = load_model(config, ckpt)
    batch = conditioning_batch(["A photo"], (64, 64))
    c, uc = model.get_learned_conditioning(batch), model.get_unconditional_conditioning(batch, [""])
    ours, _ = PLMSSampler(model).sample(S=3, conditioning=c, batch_size=1, shape=(4, 8, 8), verbose=False,
                                        unconditional_guidance_scale=5.0, unconditional_conditioning=uc,
                                        x_T=x_T.clone())
    pipe = build_pipeline(weights, torch.device("cpu"), torch.float32)
    theirs = generate(pipe, ["A photo"], "", 3, 5.0, x_T.clone(), output_type="latent")
    err = rel_err(ours, theirs)
    assert err <= 1e-4, err
    # the UNet microbenchmark's calls take the vector on both sides
    for peer in (False, True):
        opt = argparse.Namespace(peer=peer, weights=weights, config=config, attention="sdpa")
        build, call, dims = unet_factory(opt)
        unet = pipe.unet if peer else model.model.diffusion_model
        out = call(unet, torch.randn(2, 4, 8, 8), torch.tensor([981, 981]), torch.randn(2, 77, dims[1]))
        assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
