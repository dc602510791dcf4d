"""SDXL (stage 1, the model): parity with diffusers' StableDiffusionXLPipeline on the same re-randomised tiny weights
(text embeddings and pooled embedding, UNet with vector conditioning, VAE decode), the full base architecture on the
meta device against generative-models' key list, the sgm yamls and their targets, base vs refiner detection, the
converter's round trip and strict loading of the released layout."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import ROOT
from helpers import randomize_, rel_err
from ldm.model.conditioner import conditioning_batch
from ldm.model.presets import PRESETS, config_file, from_name, get_obj_from_str, instantiate_from_config, load_config
from ldm.model.sdxl import DiffusionEngine, LegacyDDPMDiscretization
from ldm.weights.detect import guess_config
from ldm.weights.families import identify
from ldm.weights.layout import to_native, to_original
from ldm.weights.reading import CheckpointError

# every key, shape and dtype of the SDXL base as generative-models builds it (a copy of the workplace's reference
# list, so that a clean clone tests against it)
REFERENCE = os.path.join(ROOT, "tests", "data", "sdxl-base.state_dict.txt")
# No "!": diffusers' SDXL tokenizer_2 has "!" as its pad token, so it turns a prompt's "!" into id 0 where open_clip's
# tokenizer (the reference's) gives "!</w>" (256); the towers agree on the same ids.
PROMPTS = ["a photograph of an astronaut riding a horse", "Ünïcode & punctuation, 123."]
SIZES = dict(original_size=(96, 80), crop_top_left=(8, 4), target_size=(64, 48))  # (height, width), (top, left)


def tiny(name: str = "sdxl-tiny", seed: int = 0) -> DiffusionEngine:
    return randomize_(DiffusionEngine(from_name(name)), seed)


# ----------------------------------------------------------------------------- diffusers built from our weights

def diffusers_unet_config(cfg, time_embed_dim: int) -> dict:
    """UNet2DConditionModel kwargs for an SDXL-shaped ``UNetConfig`` (attention only at the levels it names);
    ``time_embed_dim``: the width of each Fourier size embedding (8 tiny, 256 SDXL)."""
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [2 ** level in cfg.attention_resolutions for level in range(len(channels))]
    depth = [cfg.depth_at(level) for level in range(len(channels))]
    return dict(
        sample_size=32, in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=cfg.num_res_blocks[0],
        attention_head_dim=[cfg.heads_at(c)[0] for c in channels],  # diffusers' legacy name: heads per level
        cross_attention_dim=cfg.context_dim, use_linear_projection=cfg.use_linear_in_transformer,
        transformer_layers_per_block=depth, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=cfg.adm_in_channels, flip_sin_to_cos=True, freq_shift=0,
        norm_num_groups=32, norm_eps=1e-5, act_fn="silu", upcast_attention=False)


def size_embed_dim(cfg) -> int:
    """The width of one Fourier embedding of the size (and aesthetic score) embedders."""
    return next(e.embedder.outdim for e in cfg.conditioner.embedders if e.input_key != "txt")


def diffusers_parts(model: DiffusionEngine, tmp_path) -> dict:
    """diffusers' UNet, VAE, both text encoders and tokenizers, loaded strictly from our weights with diffusers' own
    single-file converters (the released key layout in, diffusers' out)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from types import SimpleNamespace
    from ldm.benchmark.export import load_tokenizer, vae_config, write_tokenizer
    from ldm.benchmark.peer import load_part
    from ldm.model.conditioner import OpenCLIP2Config
    cfg = model.cfg
    sd = to_original(model.state_dict())
    unet_cfg = diffusers_unet_config(cfg.unet, size_embed_dim(cfg))
    vae_cfg = vae_config(cfg.vae, cfg.scale_factor)
    parts = {"unet": load_part(lambda: UNet2DConditionModel(**unet_cfg), convert_ldm_unet_checkpoint(sd, unet_cfg)),
             "vae": load_part(lambda: AutoencoderKL(**vae_cfg), convert_ldm_vae_checkpoint(sd, vae_cfg))}
    towers = [e.embedder for e in cfg.conditioner.embedders if e.input_key == "txt"]
    write_tokenizer(str(tmp_path), "sd1")
    parts["tokenizer"] = load_tokenizer(str(tmp_path), {"kind": "sd1", "max_length": 77})
    write_tokenizer(str(tmp_path), "sd2")
    parts["tokenizer_2"] = load_tokenizer(str(tmp_path), {"kind": "sd2", "max_length": 77})
    for i, t in enumerate(towers):
        shape = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=4 * t.width,
                     num_attention_heads=t.heads, num_hidden_layers=t.layers, max_position_embeddings=77,
                     layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407)
        prefix = f"conditioner.embedders.{i}."
        if isinstance(t, OpenCLIP2Config):  # bigG: GELU, the projection of the pooled EOT feature
            tc = CLIPTextConfig(**shape, hidden_act="gelu", projection_dim=t.embed_dim, pad_token_id=0)
            stub = SimpleNamespace(config=SimpleNamespace(hidden_size=t.width))
            weights = convert_open_clip_checkpoint(stub, sd, prefix=prefix + "model.")
            parts["text_encoder_2"] = load_part(lambda: CLIPTextModelWithProjection(tc), weights)
        else:  # ViT-L: quick-GELU, padded with the end token
            tc = CLIPTextConfig(**shape, hidden_act="quick_gelu", projection_dim=t.width, pad_token_id=49407)
            weights = convert_ldm_clip_checkpoint(sd, remove_prefix=prefix + "transformer.")
            weights = {k: v for k, v in weights.items() if k.startswith("text_model.")}
            parts["text_encoder"] = load_part(lambda: CLIPTextModel(tc), weights)
    return parts


@pytest.fixture(scope="module")
def base():
    return tiny("sdxl-tiny")


@pytest.fixture(scope="module")
def peer(base, tmp_path_factory):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    parts = diffusers_parts(base, tmp_path_factory.mktemp("sdxl-tokenizers"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return StableDiffusionXLPipeline(**parts, scheduler=scheduler, force_zeros_for_empty_prompt=True)


@torch.no_grad()
def test_text_embeddings_and_pooled_match_diffusers(base, peer):
    """Context (CLIP hidden layer ++ bigG penultimate) and pooled bigG EOT projection; the empty negative prompt gives
    zeros on both sides (diffusers' force_zeros_for_empty_prompt, sgm's force_uc_zero_embeddings=["txt"])."""
    embeds, neg, pooled, neg_pooled = peer.encode_prompt(PROMPTS, device=torch.device("cpu"),
                                                         do_classifier_free_guidance=True, negative_prompt=None)
    batch = conditioning_batch(PROMPTS, **SIZES)
    c = base.get_learned_conditioning(batch)
    pooled_dim = base.cfg.conditioner.embedders[1].embedder.embed_dim
    assert c["crossattn"].shape == embeds.shape == (2, 77, 96)
    errors = rel_err(c["crossattn"], embeds), rel_err(c["vector"][:, :pooled_dim], pooled)
    assert max(errors) <= 1e-4, errors
    assert pooled.abs().max() > 0.1 and embeds.abs().max() > 0.1  # the comparison is not of near-zeros
    uc = base.get_unconditional_conditioning(batch, ["", ""])
    assert torch.equal(uc["crossattn"], neg) and torch.equal(uc["vector"][:, :pooled_dim], neg_pooled)
    assert not neg.any() and torch.equal(uc["vector"][:, pooled_dim:], c["vector"][:, pooled_dim:])  # sizes kept
    # a given negative prompt is encoded, as diffusers encodes it
    _, neg, _, neg_pooled = peer.encode_prompt(PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=True,
                                               negative_prompt=["blurry", "low quality"])
    uc = base.get_unconditional_conditioning(batch, ["blurry", "low quality"])
    errors = rel_err(uc["crossattn"], neg), rel_err(uc["vector"][:, :pooled_dim], neg_pooled)
    assert max(errors) <= 1e-4, errors


@torch.no_grad()
def test_unet_with_vector_conditioning_matches_diffusers(base, peer):
    """The UNet output with the vector conditioning: our Fourier embeddings of the sizes (sgm's order: original,
    crop, target) against diffusers' add_time_ids, through label_emb / add_embedding."""
    g = torch.Generator().manual_seed(1)
    batch = conditioning_batch(PROMPTS, **SIZES)
    c = base.get_learned_conditioning(batch)
    x, t = torch.randn(2, 4, 16, 12, generator=g), torch.tensor([999, 37])
    ours = base.apply_model(x, t, c)
    pooled_dim = base.cfg.conditioner.embedders[1].embedder.embed_dim
    time_ids = peer._get_add_time_ids(SIZES["original_size"], SIZES["crop_top_left"], SIZES["target_size"],
                                      torch.float32, text_encoder_projection_dim=pooled_dim).repeat(2, 1)
    theirs = peer.unet(x, t, encoder_hidden_states=c["crossattn"],
                       added_cond_kwargs={"text_embeds": c["vector"][:, :pooled_dim], "time_ids": time_ids}).sample
    err = rel_err(ours, theirs)
    assert err <= 1e-4, err
    # without the vector the output changes: label_emb is in the path
    c0 = dict(c, vector=torch.zeros_like(c["vector"]))
    assert rel_err(base.apply_model(x, t, c0), theirs) > 1e-2


@torch.no_grad()
def test_refiner_unet_matches_diffusers_with_aesthetic_score(tmp_path):
    """The refiner's layout: one tower, attention at the middle levels only, (original, crop, aesthetic score)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from ldm.benchmark.peer import load_part
    model = tiny("sdxl-refiner-tiny", seed=3)
    unet_cfg = diffusers_unet_config(model.cfg.unet, size_embed_dim(model.cfg))
    assert unet_cfg["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                            "DownBlock2D"]
    unet = load_part(lambda: UNet2DConditionModel(**unet_cfg),
                     convert_ldm_unet_checkpoint(to_original(model.state_dict()), unet_cfg))
    batch = conditioning_batch(PROMPTS, (96, 80), (8, 4), aesthetic_score=6.0)
    c = model.get_learned_conditioning(batch)
    assert c["crossattn"].shape == (2, 77, 64) and c["vector"].shape == (2, 88)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 3])
    time_ids = torch.tensor([[96.0, 80.0, 8.0, 4.0, 6.0]] * 2)  # diffusers' requires_aesthetics_score order
    theirs = unet(x, t, encoder_hidden_states=c["crossattn"],
                  added_cond_kwargs={"text_embeds": c["vector"][:, :48], "time_ids": time_ids}).sample
    err = rel_err(model.apply_model(x, t, c), theirs)
    assert err <= 1e-4, err
    # the refiner encodes the empty negative prompt (sgm samples it as is_legacy: no force_uc_zero_embeddings),
    # with the negative aesthetic score 2.5 of sgm's demo
    uc = model.get_unconditional_conditioning(batch, ["", ""])
    want = model.get_learned_conditioning(conditioning_batch(["", ""], (96, 80), (8, 4), aesthetic_score=2.5))
    assert torch.equal(uc["vector"], want["vector"]) and torch.equal(uc["crossattn"], want["crossattn"])
    assert uc["crossattn"].abs().max() > 0.1


@torch.no_grad()
def test_vae_decode_matches_diffusers(base, peer):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert base.scale_factor == peer.vae.config.scaling_factor == 0.13025
    err = rel_err(base.decode_first_stage(z), peer.vae.decode(z / peer.vae.config.scaling_factor).sample)
    assert err <= 1e-4, err


@torch.no_grad()
def test_unet_caching_arguments_work_with_the_vector(base):
    """DeepCache's branch/deep and T-GATE's record/cross take the vector conditioning like a plain call."""
    c = base.get_learned_conditioning(conditioning_batch(PROMPTS[:1], (64, 64)))
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([400])
    plain = base.apply_model(x, t, c)
    out, deep, _ = base.apply_model(x, t, c, branch=0)
    assert torch.equal(out, plain)
    assert torch.allclose(base.apply_model(x, t, c, branch=0, deep=deep)[0], plain, rtol=0, atol=1e-5)
    out, _, kept = base.apply_model(x, t, c, record=True)
    assert torch.equal(out, plain) and len(kept) == base.model.diffusion_model.num_cross_blocks
    assert torch.equal(base.apply_model(x, t, c, cross=kept)[0], plain)  # any caching argument: the tuple back
    with pytest.raises(ValueError, match="needs y"):
        base.model.diffusion_model(x, t, c["crossattn"])


def test_sdxl_unet_has_no_graph_breaks(base):
    """The vector conditioning keeps the UNet one graph (as the SD UNet: tests/test_compile.py)."""
    unet = base.model.diffusion_model
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 1])
    context, y = torch.randn(2, 77, 96), torch.randn(2, 96)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            explanation = torch._dynamo.explain(unet)(x, t, context, y=y)
    finally:
        torch._dynamo.reset()
    assert (explanation.graph_break_count, explanation.graph_count) == (0, 1)


# ----------------------------------------------------------------------------- full size, meta device only

def reference_keys() -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    with open(REFERENCE, encoding="utf-8") as f:
        for line in f:
            key, shape, dtype = line.rstrip("\n").split("\t")
            out[key] = (tuple(int(n) for n in shape.strip("[]").split(",") if n.strip()), dtype)
    return out


def meta_state_dict(name: str, layout: str = "original") -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = DiffusionEngine(from_name(name))
    sd = model.state_dict()
    return to_original(sd) if layout == "original" else sd


def test_full_base_state_dict_equals_the_reference_list():
    """Every key, shape and dtype of generative-models' DiffusionEngine from sd_xl_base.yaml (2,515 keys)."""
    ref = reference_keys()
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in meta_state_dict("sdxl-base").items()}
    assert len(ref) == 2515
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert [k for k in ref if ref[k] != ours[k]] == []
    unet = sum(np.prod(s) for k, (s, _) in ref.items() if k.startswith("model.diffusion_model."))
    assert round(unet / 1e6, 1) == 2567.5  # the README's count


def test_refiner_architecture():
    """The refiner's published shapes: a 384-wide UNet of 2.3 B parameters, depth 4 at two levels, a bigG-only
    1280-wide context and a 2560-wide vector."""
    sd = meta_state_dict("sdxl-refiner")
    assert sd["model.diffusion_model.label_emb.0.0.weight"].shape == (1536, 2560)
    assert sd["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape == (768, 1280)
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.3.attn1.to_q.weight" in sd
    assert not any(k.startswith(("model.diffusion_model.input_blocks.1.1.", "model.diffusion_model.input_blocks.10.1."))
                   for k in sd)  # no attention at the first and last levels
    assert not any(k.startswith("conditioner.embedders.0.transformer.") for k in sd)
    assert sd["conditioner.embedders.0.model.text_projection"].shape == (1280, 1280)
    unet = sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model."))
    assert 2.25e9 < unet < 2.27e9


def test_sigmas_are_sgms_legacy_ddpm_discretization():
    """denoiser.sigmas as sgm computes them (numpy float64 alpha_bar, float32 before the square root)."""
    betas = (np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2)
    alpha_bar = np.cumprod(1.0 - betas, axis=0)
    want = torch.tensor((1 - alpha_bar) / alpha_bar, dtype=torch.float32) ** 0.5
    from ldm.model.sdxl import DiscreteDenoiser
    sigmas = DiscreteDenoiser(from_name("sdxl-base").denoiser).sigmas  # the table alone: no model needed
    assert torch.allclose(sigmas, want, rtol=1e-6, atol=0) and sigmas.dtype == torch.float32
    steps = np.linspace(999, 0, 30, endpoint=False).astype(int)[::-1]  # sgm's roughly equally spaced steps
    got = LegacyDDPMDiscretization()(30)
    assert torch.equal(got[:-1], sigmas[torch.tensor(steps.copy())].flip(0)) and got[-1] == 0


# ----------------------------------------------------------------------------- yamls and targets

@pytest.mark.parametrize("name", ["sdxl-base", "sdxl-refiner"])
def test_shipped_sgm_yamls_are_generative_models_files(name):
    """configs/sdxl/ holds generative-models' configs/inference files byte for byte (git blob ids at 0ad7de9)."""
    import hashlib
    blobs = {"sdxl-base": "6047379753a05224bb5b3f6746130fb7fb9f40aa",
             "sdxl-refiner": "2d5ab44e748c55f5f2e34ae5aefdb78a921a8d3f"}
    data = open(config_file(PRESETS[name].yaml), "rb").read()
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blobs[name]


def test_every_sgm_target_resolves_and_instantiates():
    """instantiate_from_config builds the yaml's DiffusionEngine (on the meta device: no memory) as the class with
    the original load_state_dict; every nested target resolves too."""
    from omegaconf import OmegaConf
    from ldm.weights.loading import DiffusionEngine as LoadingEngine

    def targets(node):
        if isinstance(node, dict):
            yield from ([node["target"]] if "target" in node else [])
            for v in node.values():
                yield from targets(v)
        elif isinstance(node, list):
            for v in node:
                yield from targets(v)

    node = OmegaConf.to_container(OmegaConf.load(config_file("sdxl/sd_xl_base.yaml")))
    assert all(get_obj_from_str(t) is not None for t in targets(node))
    with torch.device("meta"):
        model = instantiate_from_config(node["model"])
    assert type(model) is LoadingEngine and model.cfg == from_name("sdxl-base")
    params = node["model"]["params"]
    scaling = instantiate_from_config(params["denoiser_config"]["params"]["scaling_config"])
    assert scaling(torch.tensor(2.0))[1] == -2.0  # c_out = -sigma
    with pytest.raises(ValueError, match="not supported"):
        get_obj_from_str("sgm.modules.encoders.modules.FrozenT5Embedder")


def test_yaml_mismatches_are_named():
    from omegaconf import OmegaConf
    node = OmegaConf.to_container(OmegaConf.load(config_file("tiny/sdxl-tiny.yaml")))
    node["model"]["params"]["network_config"]["params"]["context_dim"] = 64
    with pytest.raises(ValueError, match="96-wide context"):
        load_config(node)
    node["model"]["params"]["network_config"]["params"]["transformer_depth"] = [1, 2]
    with pytest.raises(ValueError, match="transformer_depth has 2 entries for 3 levels"):
        load_config(node)


# ----------------------------------------------------------------------------- weights: detection, layout, loading

@pytest.mark.parametrize("name, yaml", [("sdxl-base", "sdxl/sd_xl_base.yaml"),
                                        ("sdxl-refiner", "sdxl/sd_xl_refiner.yaml"),
                                        ("sdxl-tiny", "tiny/sdxl-tiny.yaml"),
                                        ("sdxl-refiner-tiny", "tiny/sdxl-refiner-tiny.yaml")])
@pytest.mark.parametrize("layout", ["original", "native_mha"])
def test_detection_tells_base_from_refiner(name, yaml, layout):
    sd = meta_state_dict(name, layout)
    path, message = guess_config(sd, "model.safetensors")
    assert path == config_file(yaml) and f"{layout} layout" in message
    assert identify(sd)[0].presets == (("eps", name),)


def test_detection_refuses_an_sd_unclip_like_label_emb():
    sd = to_original(meta_state_dict("sdxl-tiny"))
    sd = {k.replace("conditioner.embedders.1.", "cond_stage_model."): v for k, v in sd.items()
          if not k.startswith(("conditioner.embedders.0.", "denoiser."))}
    with pytest.raises(CheckpointError, match="label_emb"):
        identify(sd)


def test_layout_round_trip_is_bit_exact(tmp_path):
    from ldm.weights.convert import convert
    from safetensors.torch import load_file, save_file
    sd = tiny(seed=5).state_dict()
    orig = to_original(sd)
    assert not any(".in_proj_weight" in k for k in orig if k.startswith("model.")) and \
        any(k.endswith("attn.in_proj_weight") for k in orig)  # the OpenCLIP tower keeps its own packing
    back = to_native(orig)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    save_file({k: v.contiguous() for k, v in orig.items()}, tmp_path / "sdxl.safetensors")
    report = convert(tmp_path / "sdxl.safetensors", tmp_path / "native.safetensors", check=True)
    assert "tiny SDXL-shaped" in report.family and report.layout_out == "native_mha"
    assert report.ref_scale > 0 and report.max_diff <= 1e-5 * report.ref_scale  # --check: the UNet with its vector
    convert(tmp_path / "native.safetensors", tmp_path / "back.ckpt", to="original")
    again = torch.load(tmp_path / "back.ckpt", weights_only=True)
    again = again.get("state_dict", again)
    assert again.keys() == orig.keys() and all(torch.equal(again[k], orig[k]) for k in orig)
    native = load_file(tmp_path / "native.safetensors")
    assert all(torch.equal(native[k], sd[k]) for k in sd)


def test_load_model_reads_the_released_layout_strictly(tmp_path):
    """fp16 .safetensors as released: original attention layout, CLIP without text_model. (transformers 5) or
    with position_ids (older transformers), denoiser.sigmas absent; strict, with assign, and the same outputs."""
    from safetensors.torch import save_file
    from ldm.weights.loading import load_model
    src = tiny(seed=6)
    sd = {k: v.half().contiguous() for k, v in to_original(src.state_dict()).items() if k != "denoiser.sigmas"}
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, tmp_path / "old.safetensors")
    save_file({k.replace(".transformer.text_model.", ".transformer."): v for k, v in sd.items()},
              tmp_path / "new.safetensors")
    batch = conditioning_batch(PROMPTS, (64, 64))
    want = src.get_learned_conditioning(batch)
    for name in ("old", "new"):
        model, report = load_model(config_file("tiny/sdxl-tiny.yaml"), tmp_path / f"{name}.safetensors",
                                   dtype=torch.float32)
        assert report.layout == "original" and model.denoiser.sigmas.dtype == torch.float32
        assert model.model.diffusion_model.dtype == torch.float32
        got = model.get_learned_conditioning(batch)
        assert rel_err(got["crossattn"], want["crossattn"]) < 1e-2 and rel_err(got["vector"], want["vector"]) < 1e-2
        assert torch.equal(model.first_stage_model.quant_conv.weight,
                           src.first_stage_model.quant_conv.weight.half().float())
    del sd["model.diffusion_model.label_emb.0.2.bias"]
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="label_emb.0.2.bias"):
        load_model(config_file("tiny/sdxl-tiny.yaml"), tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="is tiny SDXL-shaped test model but the config is an SDXL refiner"):
        # an SDXL base file with the refiner's config: one line naming both
        load_model(config_file("tiny/sdxl-refiner-tiny.yaml"), tmp_path / "old.safetensors")


def test_original_api_load_state_dict(tmp_path):
    """The yaml's class (instantiate_from_config) loads the released dict with load_state_dict, as sgm's scripts do."""
    from omegaconf import OmegaConf
    src = tiny(seed=7)
    model = instantiate_from_config(OmegaConf.load(config_file("tiny/sdxl-tiny.yaml")).model)
    model.load_state_dict(to_original(src.state_dict()))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    c = src.get_learned_conditioning(conditioning_batch(PROMPTS[:1], (64, 64)))
    assert torch.equal(model.apply_model(x, t, c), src.apply_model(x, t, c))
