"""Our checkpoint in diffusers' layout, for the benchmark's peer: weights, model configs and tokenizer, offline.

    python -m ldm.benchmark.peer export --config CFG --ckpt CKPT --out DIR        # convert once

Weights are converted with diffusers' own converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_open_clip_checkpoint`` for SD 2's OpenCLIP text tower,
``convert_ldm_clip_checkpoint`` for SD 1's CLIP ViT-L/14) from the original layout; the model configs are
derived from our typed config, and the tokenizer is written from open_clip's BPE tables, so nothing
touches a hub. As in diffusers' SD 2 text encoder, the CLIP text model has the tower's layers less the
last one when the conditioning is the penultimate layer (23 of ViT-H-14's 24); SD 1's runs all 12 with
quick-GELU, and its tokenizer names the special tokens ``<|startoftext|>``/``<|endoftext|>`` and pads
with the end token (49407), where SD 2's pads with "!" (id 0) as open_clip pads with 0. An export folder
holds ``unet.pt``, ``vae.pt``, ``text_encoder.pt``, the tokenizer files and ``configs.json`` (written
last: it marks a finished export). diffusers, transformers and open_clip's tokenizer are loaded inside functions.
"""

from __future__ import annotations

import hashlib
import json
import os
from types import SimpleNamespace

import torch

from ldm.benchmark.measure import write_json
from ldm.fileio import write_text
from ldm.model.conditioner import NUMBER_KEYS

SOT, EOT = 49406, 49407  # CLIP's start and end tokens (SD 1 also pads with EOT)
OPENAI_SPECIALS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


def unet_config(cfg) -> dict:
    """UNet2DConditionModel kwargs for our ``UNetConfig``."""
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [2 ** level in cfg.attention_resolutions for level in range(len(channels))]
    if len(set(cfg.num_res_blocks)) != 1:
        raise ValueError("diffusers' UNet takes one layers_per_block; this config varies it per level")
    return dict(
        sample_size=64, in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=cfg.num_res_blocks[0],
        # diffusers' legacy naming: for this UNet ``attention_head_dim`` is the NUMBER of heads per level
        # (SD 2: [5, 10, 20, 20]), so the head width is channels / it = num_head_channels.
        attention_head_dim=[cfg.heads_at(c)[0] for c in channels],
        cross_attention_dim=cfg.context_dim, use_linear_projection=cfg.use_linear_in_transformer,
        transformer_layers_per_block=cfg.transformer_depth, flip_sin_to_cos=True, freq_shift=0,
        norm_num_groups=32, norm_eps=1e-5, act_fn="silu", upcast_attention=False)


def vae_config(cfg, scale_factor: float) -> dict:
    """AutoencoderKL kwargs for our ``VAEConfig``."""
    if cfg.embed_dim != cfg.z_channels:
        raise ValueError("diffusers' AutoencoderKL needs embed_dim == z_channels")
    levels = len(cfg.ch_mult)
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch, block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels, norm_num_groups=32, act_fn="silu",
        mid_block_add_attention=cfg.attn != "none", scaling_factor=scale_factor)


def is_sd1_text(cfg) -> bool:
    """True for SD 1's CLIP ViT-L/14 text config (ldm.model.clip), False for SD 2's OpenCLIP one."""
    from ldm.model.clip import CLIPTextConfig
    return isinstance(cfg, CLIPTextConfig)


def text_config(cfg) -> dict:
    """CLIPTextConfig kwargs: SD 1's quick-GELU tower whole, or open_clip's GELU tower cut after the layer read."""
    if is_sd1_text(cfg):
        if cfg.layer != "last":  # diffusers' clip_skip applies final_layer_norm to the hidden state; ldm does not
            raise ValueError(f"FrozenCLIPEmbedder layer={cfg.layer!r}: the peer supports the last layer only")
        return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
                    num_attention_heads=cfg.heads, num_hidden_layers=cfg.layers,
                    max_position_embeddings=cfg.context_length, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    projection_dim=cfg.width, bos_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
                num_attention_heads=cfg.heads, num_hidden_layers=cfg.layers - (cfg.layer == "penultimate"),
                max_position_embeddings=cfg.context_length, hidden_act="gelu", layer_norm_eps=1e-5,
                projection_dim=cfg.embed_dim)


def scheduler_config(model_cfg) -> dict:
    """PNDMScheduler kwargs: PLMS on SD 2's training schedule."""
    if model_cfg.beta_schedule != "linear":
        raise ValueError(f"beta_schedule {model_cfg.beta_schedule!r}: the peer supports SD's 'linear' only")
    return dict(num_train_timesteps=model_cfg.timesteps, beta_start=model_cfg.linear_start,
                beta_end=model_cfg.linear_end, beta_schedule="scaled_linear", skip_prk_steps=True,
                set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                prediction_type="v_prediction" if model_cfg.parameterization == "v" else "epsilon")


def tokenizer_config(cfg) -> dict:
    """Which special-token names and padding the peer's CLIPTokenizer uses, and its length."""
    if is_sd1_text(cfg):
        return {"kind": "sd1", "max_length": cfg.max_length}
    return {"kind": "sd2", "max_length": 77}


def write_tokenizer(out_dir: str, kind: str = "sd2") -> None:
    """vocab.json and merges.txt from open_clip's own BPE tables (no download).

    The ids are CLIP's either way; SD 1's (OpenAI's) vocabulary spells the special tokens ``<|startoftext|>``
    and ``<|endoftext|>`` where open_clip's spells them ``<start_of_text>`` and ``<end_of_text>``.
    """
    from ldm.model.openclip import open_clip_tokenizer
    tok = open_clip_tokenizer().SimpleTokenizer()
    vocab = dict(tok.encoder)
    if kind == "sd1":
        vocab = {OPENAI_SPECIALS.get(k, k): v for k, v in vocab.items()}
    write_text(os.path.join(out_dir, "vocab.json"), json.dumps(vocab))
    merges = "".join(f"{a} {b}\n" for a, b in sorted(tok.bpe_ranks, key=tok.bpe_ranks.get))
    write_text(os.path.join(out_dir, "merges.txt"), "#version: 0.2\n" + merges)


def load_tokenizer(weights: str, cfg: dict | None = None):
    """CLIPTokenizer over CLIP's vocabulary: SD 1 pads with <|endoftext|> (49407); SD 2 with "!" (id 0), as
    open_clip pads with 0. ``cfg`` is the export's "tokenizer" entry (exports predating it are SD 2's)."""
    from transformers import CLIPTokenizer
    cfg = cfg or {"kind": "sd2", "max_length": 77}
    files = os.path.join(weights, "vocab.json"), os.path.join(weights, "merges.txt")
    if cfg["kind"] == "sd1":
        return CLIPTokenizer(*files, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=cfg["max_length"])
    return CLIPTokenizer(*files, bos_token="<start_of_text>", eos_token="<end_of_text>", unk_token="<end_of_text>",
                         pad_token="!", model_max_length=cfg["max_length"])


def convert_weights(sd: dict[str, torch.Tensor], model_cfg) -> dict[str, dict[str, torch.Tensor]]:
    """Our (native or original) full state dict -> diffusers' unet / vae / text_encoder state dicts."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from ldm.weights.layout import detect_layout, to_original
    if detect_layout(sd) == "native_mha":
        sd = to_original(sd)
    unet = convert_ldm_unet_checkpoint(sd, unet_config(model_cfg.unet))
    vae = convert_ldm_vae_checkpoint(sd, vae_config(model_cfg.vae, model_cfg.scale_factor))
    if is_sd1_text(model_cfg.text):
        text_config(model_cfg.text)  # raises for a layer the peer cannot read
        # cond_stage_model.transformer.text_model.* -> text_model.* (load_part drops the level transformers lacks)
        text = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith("cond_stage_model.")})
        return {"unet": unet, "vae": vae, "text_encoder": text}
    prefix = "cond_stage_model.model."
    kept = text_config(model_cfg.text)["num_hidden_layers"]
    text_sd = {k: v for k, v in sd.items() if k.startswith(prefix) and not any(
        k.startswith(f"{prefix}transformer.resblocks.{i}.") for i in range(kept, model_cfg.text.layers))}

    # The converter reads the text model only for config.hidden_size, and only when text_projection is missing.
    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=model_cfg.text.width))
    text = convert_open_clip_checkpoint(text_model, text_sd, prefix=prefix)
    text.pop("text_projection.weight", None)  # CLIPTextModel has no projection (it is CLIP's, not the tower's)
    return {"unet": unet, "vae": vae, "text_encoder": text}


# ----- SDXL: our checkpoint as diffusers' StableDiffusionXLPipeline parts, with the same converters on the released
# layout: ``convert_ldm_unet_checkpoint``
# (the UNet with ``addition_embed_type="text_time"``: diffusers' add_embedding is our label_emb),
# ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` for CLIP ViT-L/14 (all its layers: the pipeline
# reads hidden_states[-2], the base yaml's layer 11 of 12) and ``convert_open_clip_checkpoint`` for bigG
# (``CLIPTextModelWithProjection``: the pooled, projected EOT feature). Each tower gets its tokenizer folder
# (``tokenizer``: CLIP's, padded with the end token; ``tokenizer_2``: open_clip's, padded with "!" = 0). The scheduler
# is PLMS (``PNDMScheduler``) on SDXL's 1,000-step schedule, as the harness runs ours with --plms; the empty negative
# prompt is zeroed (``force_zeros_for_empty_prompt``), as sgm samples the base.


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


def sdxl_state_dicts(model_cfg, sd: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict, dict, dict]:
    """(diffusers' state dict per part, UNet config, VAE config, ``tower_configs``) of an SDXL base (or refiner: one
    tower) from ``sd`` in either layout, with diffusers' own single-file converters; in the released layout's
    tensors (views, except bigG's Q/K/V split out of one in_proj)."""
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
        if name == "text_encoder_2":  # bigG: the pooled, projected EOT feature
            stub = SimpleNamespace(config=SimpleNamespace(hidden_size=tc["hidden_size"]))
            parts[name] = convert_open_clip_checkpoint(stub, sd, prefix=prefix + "model.")
        else:  # CLIP ViT-L, all its layers (the pipeline reads hidden_states[-2])
            text = convert_ldm_clip_checkpoint(sd, remove_prefix=prefix + "transformer.")
            parts[name] = {k: v for k, v in text.items() if k.startswith("text_model.")}
    return parts, unet_cfg, vae_cfg, towers


def export_sdxl(model_cfg, sd: dict[str, torch.Tensor], out_dir: str) -> str:
    """Write diffusers' parts of an SDXL base (or refiner: one tower) into ``out_dir``; configs.json last."""
    parts, unet_cfg, vae_cfg, towers = sdxl_state_dicts(model_cfg, sd)
    for name in towers:
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


def export(config: str, ckpt: str, out_dir: str) -> str:
    """Convert ``ckpt`` for diffusers into ``out_dir`` (weights, configs, tokenizer); returns out_dir."""
    from ldm.model.presets import load_config
    from ldm.weights.reading import read_checkpoint, split_extras
    model_cfg = load_config(config)
    sd, _ = read_checkpoint(ckpt)
    sd, _ = split_extras(sd)
    if hasattr(model_cfg, "conditioner"):  # SDXL: StableDiffusionXLPipeline's parts
        os.makedirs(out_dir, exist_ok=True)
        return export_sdxl(model_cfg, sd, out_dir)
    parts = convert_weights(sd, model_cfg)
    os.makedirs(out_dir, exist_ok=True)
    for name, part in parts.items():
        torch.save({k: v.contiguous() for k, v in part.items()}, os.path.join(out_dir, f"{name}.pt"))
    tokenizer = tokenizer_config(model_cfg.text)
    write_tokenizer(out_dir, tokenizer["kind"])
    configs = {"unet": unet_config(model_cfg.unet), "vae": vae_config(model_cfg.vae, model_cfg.scale_factor),
               "text_encoder": text_config(model_cfg.text), "scheduler": scheduler_config(model_cfg),
               "tokenizer": tokenizer}
    write_json(os.path.join(out_dir, "configs.json"), configs)  # written last: it marks a finished export
    return out_dir


def cached_export(config: str, ckpt: str, cache_dir: str) -> str:
    """``export`` into a cache folder named after the checkpoint's path, size and mtime and the config's text."""
    st = os.stat(ckpt)
    with open(config, "rb") as f:
        key = f"{os.path.abspath(ckpt)}|{st.st_size}|{st.st_mtime_ns}|".encode() + f.read()
    stem = os.path.splitext(os.path.basename(ckpt))[0]
    out = os.path.join(cache_dir, f"{stem}-{hashlib.sha256(key).hexdigest()[:10]}-diffusers")
    if not os.path.isfile(os.path.join(out, "configs.json")):
        export(config, ckpt, out)
    return out
