"""The preset table (ldm.model.presets): each preset is what its shipped yaml maps to; one set of defaults;
config files found in the checkout; open_clip archs registered at run time."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from ldm.model.clip import CLIPTextConfig
from ldm.model.diffusion import DiffusionConfig
from ldm.model.openclip import TextConfig
from ldm.model.presets import PRESETS, config_file, config_root, from_name, load_config
from ldm.model.unet import UNetConfig
from ldm.model.vae import VAEConfig


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_equals_its_yaml(name):
    preset = PRESETS[name]
    assert load_config(config_file(preset.yaml)) == preset.config == from_name(name)
    native = preset.native_yaml()
    if native is not None:  # the _native_mha variant differs in the layout it names, nothing else
        assert load_config(config_file(native)) == dataclasses.replace(preset.config, checkpoint_layout="native_mha")


def test_every_shipped_yaml_is_a_preset_or_its_native_variant():
    shipped = {os.path.relpath(os.path.join(d, f), config_root()) for d, _, files in os.walk(config_root())
               for f in files if f.endswith(".yaml")}
    named = {p.yaml for p in PRESETS.values()} | {p.native_yaml() for p in PRESETS.values()} - {None}
    assert shipped == named


def test_presets_have_the_released_shapes():
    """Closed-form facts of the released models, independent of the yamls: SD 1 has 8 heads of width 40..160
    and a 768-wide CLIP context; SD 2 heads of width 64, linear projections and a 1024-wide OpenCLIP context."""
    sd1, sd2 = from_name("sd1"), from_name("sd2")
    assert [sd1.unet.heads_at(320 * m) for m in (1, 2, 4)] == [(8, 40), (8, 80), (8, 160)]
    assert [sd2.unet.heads_at(320 * m) for m in (1, 2, 4)] == [(5, 64), (10, 64), (20, 64)]
    assert (sd1.unet.context_dim, sd1.text.width, sd2.unet.context_dim, sd2.text.width) == (768, 768, 1024, 1024)
    assert (sd2.text.layers, sd2.text.heads, sd2.text.layer) == (24, 16, "penultimate")
    assert from_name("sd2-v").parameterization == "v" and from_name("sd2-inpainting").unet.in_channels == 9
    with pytest.raises(ValueError, match="unknown model preset"):
        from_name("sdxl")


def _minimal_yaml_params():
    """The smallest params block each mapping accepts: only the keys without a default."""
    unet = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
            "num_res_blocks": 1, "context_dim": 64, "num_heads": 2, "channel_mult": [1, 2]}
    vae = {"embed_dim": 4, "ddconfig": {"z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 32,
                                        "num_res_blocks": 1}}
    return {"unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": {}}}


def test_yaml_fallbacks_are_the_dataclass_defaults():
    """A key the yaml leaves out means the dataclass default, and that default is the original's."""
    cfg = DiffusionConfig.from_params(_minimal_yaml_params())
    want = DiffusionConfig(
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=(1,),
                        num_res_blocks=(1, 1), context_dim=64, num_heads=2, channel_mult=(1, 2)),
        vae=VAEConfig(embed_dim=4, z_channels=4, in_channels=3, out_ch=3, ch=32, num_res_blocks=1),
        text=TextConfig())
    assert cfg == want
    # the original's defaults (ldm.models.diffusion.ddpm.DDPM, openaimodel.UNetModel, model.Encoder, FrozenOpenCLIPEmbedder)
    assert (cfg.linear_start, cfg.linear_end, cfg.scale_factor, cfg.parameterization) == (1e-4, 2e-2, 1.0, "eps")
    assert (cfg.unet.use_linear_in_transformer, cfg.unet.transformer_depth, cfg.vae.double_z) == (False, 1, True)
    unet = {k: v for k, v in _minimal_yaml_params()["unet_config"]["params"].items() if k != "channel_mult"}
    assert UNetConfig.from_params(unet).channel_mult == (1, 2, 4, 8)
    assert (cfg.text.layer, cfg.text.width, cfg.text.layers) == ("last", 1024, 24)  # arch ViT-H-14
    assert CLIPTextConfig.from_params({}) == CLIPTextConfig()


def test_missing_required_keys_are_named():
    params = _minimal_yaml_params()
    del params["unet_config"]["params"]["context_dim"]
    with pytest.raises(ValueError, match="UNetModel: missing config key.*context_dim"):
        DiffusionConfig.from_params(params)


def test_open_clip_arch_registered_at_run_time(tmp_path):
    """An arch added with open_clip.add_model_config is found, as the original's open_clip.create_model finds it."""
    open_clip = pytest.importorskip("open_clip")
    arch = "ldm-test-text-arch"
    with pytest.raises(ValueError, match="unknown open_clip arch"):
        TextConfig.from_params({"arch": arch})
    mc = {"embed_dim": 48, "vision_cfg": {"layers": 1, "width": 32, "patch_size": 16, "image_size": 32},
          "text_cfg": {"width": 96, "heads": 6, "layers": 2, "context_length": 77, "vocab_size": 49408}}
    (tmp_path / f"{arch}.json").write_text(json.dumps(mc))
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    cfg = TextConfig.from_params({"arch": arch, "layer": "penultimate"})
    assert (cfg.width, cfg.heads, cfg.layers, cfg.embed_dim, cfg.layer) == (96, 6, 2, 48, "penultimate")
    for bad in ("hf-hub:org/model", "../ViT-H-14", "local-dir:x"):
        with pytest.raises(ValueError, match="unknown open_clip arch"):
            TextConfig.from_params({"arch": bad})


def test_shipped_arch_does_not_import_open_clip():
    """Start-up: a shipped arch (ViT-H-14) is read from open_clip's JSON file, without importing the package."""
    code = ("import sys; from ldm.model.presets import load_config, config_file; "
            "load_config(config_file('stable-diffusion/v2-inference.yaml')); print('open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
