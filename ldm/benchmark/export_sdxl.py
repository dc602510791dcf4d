"""SDXL for the benchmark's peer: our checkpoint as diffusers' StableDiffusionXLPipeline parts, offline.

The same converters as SD's (``ldm.benchmark.export``) on the released layout: ``convert_ldm_unet_checkpoint``
(the UNet with ``addition_embed_type="text_time"``: diffusers' add_embedding is our label_emb),
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` for CLIP ViT-L/14 (all its layers: the pipeline
reads hidden_states[-2], the base yaml's layer 11 of 12) and ``convert_open_clip_checkpoint`` for bigG
(``CLIPTextModelWithProjection``: the pooled, projected EOT feature). Each tower gets its tokenizer folder
(``tokenizer``: CLIP's, padded with the end token; ``tokenizer_2``: open_clip's, padded with "!" = 0). The scheduler
is PLMS (``PNDMScheduler``) on SDXL's 1,000-step schedule, as the harness runs ours with --plms; the empty negative
prompt is zeroed (``force_zeros_for_empty_prompt``), as sgm samples the base.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch

from ldm.benchmark.export import EOT, SOT, load_tokenizer, unet_config, vae_config, write_tokenizer
from ldm.benchmark.measure import write_json
from ldm.model.conditioner import NUMBER_KEYS


def sdxl_unet_config(cfg, time_embed_dim: int) -> dict:
    """UNet2DConditionModel kwargs for an SDXL ``UNetConfig`` (per-level depth, the text_time vector)."""
    return {**unet_config(cfg), "sample_size": 128, "transformer_layers_per_block":
            [cfg.depth_at(level) for level in range(len(cfg.channel_mult))], "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_embed_dim, "projection_class_embeddings_input_dim": cfg.adm_in_channels}


def tower_configs(model_cfg) -> dict[str, tuple[int, dict]]:
    """"text_encoder"/"text_encoder_2" -> (embedder index, transformers CLIPTextConfig kwargs)."""
    from ldm.model.conditioner import OpenCLIP2Config
    out = {}
    for i, e in enumerate(model_cfg.conditioner.embedders):
        t = e.embedder
        if e.input_key != "txt":
            continue
        shape = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=4 * t.width,
                     num_attention_heads=t.heads, num_hidden_layers=t.layers, max_position_embeddings=77,
                     layer_norm_eps=1e-5, bos_token_id=SOT, eos_token_id=EOT)
        if isinstance(t, OpenCLIP2Config):
            out["text_encoder_2"] = i, dict(shape, hidden_act="gelu", projection_dim=t.embed_dim, pad_token_id=0)
        else:
            out["text_encoder"] = i, dict(shape, hidden_act="quick_gelu", projection_dim=t.width, pad_token_id=EOT)
    return out


def fourier_dim(model_cfg) -> int:
    return next(e.embedder.outdim for e in model_cfg.conditioner.embedders if e.input_key != "txt")


def export_sdxl(model_cfg, sd: dict[str, torch.Tensor], out_dir: str) -> str:
    """Write diffusers' parts of an SDXL base (or refiner: one tower) into ``out_dir``; configs.json last."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from ldm.weights.layout import detect_layout, to_original
    if detect_layout(sd) == "native_mha":
        sd = to_original(sd)
    unet_cfg = sdxl_unet_config(model_cfg.unet, fourier_dim(model_cfg))
    vae_cfg = vae_config(model_cfg.vae, model_cfg.scale_factor)
    parts = {"unet": convert_ldm_unet_checkpoint(sd, unet_cfg), "vae": convert_ldm_vae_checkpoint(sd, vae_cfg)}
    towers = tower_configs(model_cfg)
    for name, (i, tc) in towers.items():
        prefix = f"conditioner.embedders.{i}."
        if name == "text_encoder_2":
            stub = SimpleNamespace(config=SimpleNamespace(hidden_size=tc["hidden_size"]))
            parts[name] = convert_open_clip_checkpoint(stub, sd, prefix=prefix + "model.")
        else:
            text = convert_ldm_clip_checkpoint(sd, remove_prefix=prefix + "transformer.")
            parts[name] = {k: v for k, v in text.items() if k.startswith("text_model.")}
        folder = os.path.join(out_dir, "tokenizer" if name == "text_encoder" else "tokenizer_2")
        os.makedirs(folder, exist_ok=True)
        write_tokenizer(folder, "sd1" if name == "text_encoder" else "sd2")
    for name, part in parts.items():
        torch.save({k: v.contiguous() for k, v in part.items()}, os.path.join(out_dir, f"{name}.pt"))
    d = model_cfg.denoiser
    scheduler = dict(num_train_timesteps=d.num_timesteps, beta_start=d.linear_start, beta_end=d.linear_end,
                     beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                     timestep_spacing="leading", prediction_type="epsilon")
    configs = {"family": "sdxl", "unet": unet_cfg, "vae": vae_cfg, "scheduler": scheduler,
               **{name: tc for name, (_, tc) in towers.items()},
               "force_zeros_for_empty_prompt": bool(model_cfg.zeroes_empty_negative),
               "time_ids": sum(NUMBER_KEYS[k] for k in model_cfg.conditioner.input_keys if k in NUMBER_KEYS)}
    write_json(os.path.join(out_dir, "configs.json"), configs)  # written last: it marks a finished export
    return out_dir


def build_sdxl_pipeline(weights: str, device: torch.device, dtype: torch.dtype):
    """StableDiffusionXLPipeline (or the img2img pipeline for a refiner export) from an ``export_sdxl`` folder."""
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from ldm.benchmark.peer import load_part
    with open(os.path.join(weights, "configs.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    part = lambda name: os.path.join(weights, f"{name}.pt")
    parts = {"unet": load_part(lambda: UNet2DConditionModel(**cfg["unet"]), part("unet")),
             "vae": load_part(lambda: AutoencoderKL(**cfg["vae"]), part("vae")),
             "scheduler": PNDMScheduler(**cfg["scheduler"])}
    parts["text_encoder_2"] = load_part(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
                                        part("text_encoder_2"))
    parts["tokenizer_2"] = load_tokenizer(os.path.join(weights, "tokenizer_2"), {"kind": "sd2", "max_length": 77})
    if "text_encoder" in cfg:
        parts["text_encoder"] = load_part(lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
                                          part("text_encoder"))
        parts["tokenizer"] = load_tokenizer(os.path.join(weights, "tokenizer"), {"kind": "sd1", "max_length": 77})
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=cfg["force_zeros_for_empty_prompt"])
    else:
        pipe = StableDiffusionXLImg2ImgPipeline(**parts, text_encoder=None, tokenizer=None,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


__all__ = ["sdxl_unet_config", "tower_configs", "export_sdxl", "build_sdxl_pipeline"]
