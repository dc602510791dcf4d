"""The known models by name (gpt-fast's ``from_name``), the yaml files that describe them, and yaml -> typed config.

``PRESETS`` is the one table of model shapes: each entry is the typed ``DiffusionConfig`` its yaml maps to
(a test checks every one against its file) and that yaml's place under ``configs/``. The yamls are input
data users pass in; they live in the checkout's top-level ``configs/`` and, installed, in the package
(``ldm/configs``), and ``config_file`` finds them in either place.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, replace
from typing import Any

from ldm.model.clip import CLIPTextConfig
from ldm.model.conditioner import ConditionerConfig, EmbedderConfig, FourierConfig, OpenCLIP2Config
from ldm.model.config import fits, kind, one_line, shown, to_plain
from ldm.model.diffusion import INPAINT_TARGETS, DiffusionConfig, model_config
from ldm.model.openclip import TextConfig
from ldm.model.sdxl import ENGINE_TARGETS, DenoiserConfig, SDXLConfig
from ldm.model.unet import UNetConfig
from ldm.model.vae import VAEConfig

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../ldm


def config_root() -> str:
    """The folder of the shipped yamls: ``ldm/configs`` when installed, else the checkout's ``configs/``."""
    installed = os.path.join(_PACKAGE, "configs")
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(_PACKAGE), "configs")


def config_file(rel: str) -> str:
    """The absolute path of a shipped yaml, e.g. ``config_file("stable-diffusion/v2-inference.yaml")``."""
    return os.path.join(config_root(), rel)


def config_shown(rel: str) -> str:
    """A shipped yaml as messages name it: ``configs/...`` in a checkout (as the original's command lines do),
    the installed file's path otherwise (an installed user has no configs/ folder)."""
    installed = os.path.isdir(os.path.join(_PACKAGE, "configs"))
    return config_file(rel) if installed else "configs/" + rel


@dataclass(frozen=True)
class Preset:
    """A known model: its typed config and the shipped yaml (under ``configs/``, original layout) it comes from."""
    config: DiffusionConfig | SDXLConfig
    yaml: str

    def native_yaml(self) -> str | None:
        """The ``_native_mha`` variant of ``yaml`` when one is shipped (either yaml loads either layout)."""
        rel = self.yaml[: -len(".yaml")] + "_native_mha.yaml"
        return rel if os.path.isfile(config_file(rel)) else None


def _sd_unet(context_dim: int, in_channels: int, sd1: bool) -> UNetConfig:
    heads = dict(num_heads=8) if sd1 else dict(num_head_channels=64, use_linear_in_transformer=True)
    return UNetConfig(in_channels=in_channels, out_channels=4, model_channels=320, attention_resolutions=(4, 2, 1),
                      num_res_blocks=(2, 2, 2, 2), channel_mult=(1, 2, 4, 4), context_dim=context_dim, **heads)


def _tiny_unet(in_channels: int, sd1: bool) -> UNetConfig:
    heads = dict(num_heads=2) if sd1 else dict(num_head_channels=16, use_linear_in_transformer=True)
    return UNetConfig(in_channels=in_channels, out_channels=4, model_channels=32, attention_resolutions=(2, 1),
                      num_res_blocks=(1, 1), channel_mult=(1, 2), context_dim=64, **heads)


_SD_VAE = VAEConfig(embed_dim=4, z_channels=4, in_channels=3, out_ch=3, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2)
_TINY_VAE = replace(_SD_VAE, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
_SD1_TEXT = CLIPTextConfig()  # openai/clip-vit-large-patch14, last layer
_SD2_TEXT = TextConfig(layer="penultimate")  # open_clip ViT-H-14
_SD = dict(linear_start=0.00085, linear_end=0.012, scale_factor=0.18215)
_INPAINT = dict(conditioning_key="hybrid", concat_keys=("mask", "masked_image"), masked_image_key="masked_image")


def _sd(unet: UNetConfig, vae: VAEConfig, text, **kw) -> DiffusionConfig:
    return DiffusionConfig(unet=unet, vae=vae, text=text, **_SD, **kw)


def _sdxl_unet(model_channels: int, channel_mult: tuple[int, ...], depth, context_dim: int, adm: int,
               head_channels: int = 64) -> UNetConfig:
    return UNetConfig(in_channels=4, out_channels=4, model_channels=model_channels, attention_resolutions=(4, 2),
                      num_res_blocks=(2,) * len(channel_mult), channel_mult=channel_mult, context_dim=context_dim,
                      num_head_channels=head_channels, use_linear_in_transformer=True, transformer_depth=depth,
                      num_classes="sequential", adm_in_channels=adm)


def _sdxl_conditioner(clip: CLIPTextConfig | None, bigg: OpenCLIP2Config, outdim: int, refiner: bool):
    numbers = ("original_size_as_tuple", "crop_coords_top_left",
               "aesthetic_score" if refiner else "target_size_as_tuple")
    texts = ((EmbedderConfig("txt", clip),) if clip else ()) + (EmbedderConfig("txt", bigg),)
    return ConditionerConfig(texts + tuple(EmbedderConfig(k, FourierConfig(outdim)) for k in numbers))


_SDXL_CLIP = CLIPTextConfig(layer="hidden", layer_idx=11)  # ViT-L/14, the 11th of 12 layers, no final norm
_SDXL_BIGG = OpenCLIP2Config(width=1280, heads=20, layers=32, embed_dim=1280, layer="penultimate",
                             always_return_pooled=True, legacy=False)  # ViT-bigG-14
_TINY_CLIP = CLIPTextConfig(width=32, heads=2, layers=3, layer="hidden", layer_idx=2, version="custom")
_TINY_BIGG = OpenCLIP2Config(width=64, heads=4, layers=3, embed_dim=48, layer="penultimate",
                             always_return_pooled=True, legacy=False)
_SDXL_DENOISER = DenoiserConfig(num_idx=1000)


def _sdxl(unet: UNetConfig, vae: VAEConfig, conditioner: ConditionerConfig) -> SDXLConfig:
    return SDXLConfig(unet=unet, vae=vae, conditioner=conditioner, denoiser=_SDXL_DENOISER, scale_factor=0.13025)


SD, TINY, SDXL = "stable-diffusion/", "tiny/", "sdxl/"
PRESETS: dict[str, Preset] = {
    "sd1": Preset(_sd(_sd_unet(768, 4, True), _SD_VAE, _SD1_TEXT), SD + "v1-inference.yaml"),
    "sd1-inpainting": Preset(_sd(_sd_unet(768, 9, True), _SD_VAE, _SD1_TEXT, **_INPAINT),
                             SD + "v1-inpainting-inference.yaml"),
    "sd2": Preset(_sd(_sd_unet(1024, 4, False), _SD_VAE, _SD2_TEXT), SD + "v2-inference.yaml"),  # 512px, eps
    "sd2-v": Preset(_sd(_sd_unet(1024, 4, False), _SD_VAE, _SD2_TEXT, parameterization="v"),
                    SD + "v2-inference-v.yaml"),  # 768px
    "sd2-inpainting": Preset(_sd(_sd_unet(1024, 9, False), _SD_VAE, _SD2_TEXT, **_INPAINT),
                             SD + "v2-inpainting-inference.yaml"),
    "tiny": Preset(_sd(_tiny_unet(4, False), _TINY_VAE, TextConfig(width=64, heads=4, layers=3, embed_dim=64,
                                                                  layer="penultimate")), TINY + "v2-tiny.yaml"),
    "sd1-tiny": Preset(_sd(_tiny_unet(4, True), _TINY_VAE, CLIPTextConfig(width=64, heads=4, layers=3,
                                                                         version="custom")), TINY + "v1-tiny.yaml"),
}
PRESETS.update({
    "sdxl-base": Preset(_sdxl(_sdxl_unet(320, (1, 2, 4), (1, 2, 10), 2048, 2816), _SD_VAE,
                              _sdxl_conditioner(_SDXL_CLIP, _SDXL_BIGG, 256, False)), SDXL + "sd_xl_base.yaml"),
    "sdxl-refiner": Preset(_sdxl(_sdxl_unet(384, (1, 2, 4, 4), 4, 1280, 2560), _SD_VAE,
                                 _sdxl_conditioner(None, _SDXL_BIGG, 256, True)), SDXL + "sd_xl_refiner.yaml"),
    # SDXL-shaped: no attention at the first level, depth per level (the middle block takes the last), two towers
    "sdxl-tiny": Preset(_sdxl(_sdxl_unet(32, (1, 2, 2), (1, 1, 2), 96, 48 + 6 * 8, head_channels=16), _TINY_VAE,
                              _sdxl_conditioner(_TINY_CLIP, _TINY_BIGG, 8, False)), TINY + "sdxl-tiny.yaml"),
    "sdxl-refiner-tiny": Preset(_sdxl(_sdxl_unet(32, (1, 2, 2, 2), 2, 64, 48 + 5 * 8, head_channels=16), _TINY_VAE,
                                      _sdxl_conditioner(None, _TINY_BIGG, 8, True)), TINY + "sdxl-refiner-tiny.yaml"),
})
PRESETS["tiny-v"] = Preset(replace(PRESETS["tiny"].config, parameterization="v"), TINY + "v2-tiny-v.yaml")
PRESETS["tiny-inpainting"] = Preset(replace(PRESETS["tiny"].config, unet=_tiny_unet(9, False), **_INPAINT),
                                    TINY + "v2-tiny-inpainting.yaml")


def from_name(name: str) -> DiffusionConfig | SDXLConfig:
    """The typed config of a preset (``sd1``, ``sd2``, ``sd2-v``, ``tiny``, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].config


def load_config(config: Any) -> DiffusionConfig | SDXLConfig:
    """A DiffusionConfig (SD 1.x/2.x: ``LatentDiffusion``) or SDXLConfig (generative-models' ``DiffusionEngine``)
    from a yaml path, an OmegaConf/dict of the whole file or of ``model``, or itself.

    A yaml path that cannot be read (binary, bad syntax), is empty or not a mapping, has a value of the wrong type
    for a known key, or does not map to a model is one ValueError naming the file and the key.
    """
    if isinstance(config, (DiffusionConfig, SDXLConfig)):
        return config
    path = None
    if isinstance(config, (str, os.PathLike)):
        from omegaconf import OmegaConf
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config not found: {path}")
        try:
            config = OmegaConf.load(path)
        except Exception as e:  # yaml syntax errors, UnicodeDecodeError for binary files, OmegaConf's own
            raise ValueError(f"{path}: not a readable yaml file ({one_line(e)})") from e
    try:
        node = to_plain(config)
        if not node:
            raise ValueError("the file is empty" if path else "the config is empty")
        if not isinstance(node, dict):
            raise ValueError(f"expected a mapping (model: target/params), got a {type(node).__name__}")
        where = "model" if "model" in node else ""
        node = node.get("model", node)
        _check_types(node, where)
        if "params" not in node:
            raise ValueError(f"{where or 'the config'} has no params: it does not describe a model")
        target = node.get("target", "ldm.models.diffusion.ddpm.LatentDiffusion")
        if target in ENGINE_TARGETS:
            return SDXLConfig.from_params(node.get("params", {}))
        if not target.endswith("LatentDiffusion") and target not in INPAINT_TARGETS:
            raise ValueError(f"config model target {target!r} is not supported (LatentDiffusion, "
                             "LatentInpaintDiffusion, sgm.models.diffusion.DiffusionEngine)")
        return model_config(target, node.get("params", {}))
    except Exception as e:  # the typed mapping's ValueErrors and TypeErrors, OmegaConf interpolation errors
        if path is None:
            raise
        raise ValueError(f"{path}: {one_line(e)}") from e


def _check_types(model: Any, where: str) -> None:
    """Every known key of a yaml ``model`` node has a value of its typed config field's type (a list for a tuple),
    so a wrong type is named by its key here, not met later as a TypeError deep in the model."""
    from typing import get_type_hints
    from ldm.model.diffusion import TEXT_TARGETS

    def at(*keys: str) -> str:
        return ".".join(k for k in (where, *keys) if k)

    def mapping(value: Any, *keys: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{at(*keys)}: expected a mapping, got {shown(value)}")
        if not isinstance(value.get("target", ""), str):
            raise ValueError(f"{at(*keys, 'target')}: expected a string, got {shown(value['target'])}")
        return value

    def fields(node: dict, hints: dict, *keys: str) -> None:
        for key, value in node.items():
            hint = hints.get(key)
            if hint is not None and not fits(value, hint):
                raise ValueError(f"{at(*keys, key)}: expected {kind(hint)}, got {shown(value)}")

    params = mapping(mapping(model).get("params"), "params")
    sdxl = mapping(model).get("target") in ENGINE_TARGETS
    typed = SDXLConfig if sdxl else DiffusionConfig
    own = {k: v for k, v in get_type_hints(typed).items() if k not in ("unet", "vae", "text", "conditioner",
                                                                        "denoiser")}
    fields(params, own, "params")
    key = "network_config" if sdxl else "unet_config"
    unet = mapping(mapping(params.get(key), "params", key).get("params"), "params", key, "params")
    unet_hints = dict(get_type_hints(UNetConfig), num_res_blocks=int | tuple[int, ...],  # one int for every level
                      context_dim=int | tuple[int, ...])  # sgm: one per level
    fields(unet, unet_hints, "params", key, "params")
    vae = mapping(mapping(params.get("first_stage_config"), "params", "first_stage_config").get("params"),
                  "params", "first_stage_config", "params")
    fields(vae, {"embed_dim": int}, "params", "first_stage_config", "params")
    dd = mapping(vae.get("ddconfig"), "params", "first_stage_config", "params", "ddconfig")
    fields(dd, {k: v for k, v in get_type_hints(VAEConfig).items() if k not in ("embed_dim", "attn")},
           "params", "first_stage_config", "params", "ddconfig")
    if sdxl:  # the conditioner's embedders are checked by ConditionerConfig.from_params, each named by index
        return
    text_node = mapping(params.get("cond_stage_config"), "params", "cond_stage_config")
    text = mapping(text_node.get("params"), "params", "cond_stage_config", "params")
    text_cls = TEXT_TARGETS.get(text_node.get("target"), TextConfig)
    fields(text, dict(get_type_hints(text_cls), arch=str, max_length=int, version=str),
           "params", "cond_stage_config", "params")


# generative-models' yaml targets -> where that code lives here: a mapping, not a top-level ``sgm`` package, which
# would shadow Stability's own when both are installed. DiffusionEngine resolves, as the original yamls'
# LatentDiffusion does, to the class with the original ``load_state_dict`` (either layout, extras ignored).
SGM_TARGETS = {
    "sgm.models.diffusion.DiffusionEngine": "ldm.weights.loading.DiffusionEngine",
    "sgm.modules.diffusionmodules.openaimodel.UNetModel": "ldm.model.unet.UNetModel",
    "sgm.models.autoencoder.AutoencoderKL": "ldm.model.vae.AutoencoderKL",
    "sgm.modules.GeneralConditioner": "ldm.model.conditioner.GeneralConditioner",
    "sgm.modules.encoders.modules.FrozenCLIPEmbedder": "ldm.model.clip.FrozenCLIPEmbedder",
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2": "ldm.model.conditioner.FrozenOpenCLIPEmbedder2",
    "sgm.modules.encoders.modules.ConcatTimestepEmbedderND": "ldm.model.conditioner.ConcatTimestepEmbedderND",
    "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser": "ldm.model.sdxl.DiscreteDenoiser",
    "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling": "ldm.model.sdxl.EpsScaling",
    "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization": "ldm.model.sdxl.LegacyDDPMDiscretization",
}


def get_obj_from_str(string: str) -> Any:
    """'pkg.module.Name' -> the object (generative-models' ``sgm.*`` names through ``SGM_TARGETS``)."""
    if string.startswith("sgm.") and string not in SGM_TARGETS:
        raise ValueError(f"target {string!r}: this generative-models class is not supported (known: "
                         f"{', '.join(sorted(SGM_TARGETS))})")
    module, cls = SGM_TARGETS.get(string, string).rsplit(".", 1)
    return getattr(importlib.import_module(module, package=None), cls)


def instantiate_from_config(config: Any) -> Any:
    """Build ``config.target(**config.params)``, as the original ``ldm.util`` does.

    For LatentDiffusion this constructs the model with random weights on the CPU (as the original);
    ``ldm.weights.loading.load_model`` is the fast path that builds on the meta device and loads strictly.
    """
    node = to_plain(config)
    if "target" not in node:
        if node in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(node["target"])(**(node.get("params") or {}))
