"""SD 1.x: CLIP text encoder vs transformers, UNet vs diffusers, original checkpoints, converter, guess_config.

References are independent: transformers' ``CLIPTokenizer`` (built offline from open_clip's BPE tables, with
the special-token names of openai/clip-vit-large-patch14) and ``CLIPTextModel`` (eager attention, quick_gelu),
and diffusers' ``UNet2DConditionModel`` mapped from the original checkpoint keys by diffusers' own converter.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from conftest import ROOT
from helpers import load_on_meta, need_disk, randomize_, rel_err, small_norm_inputs
from ldm.weights.reading import CLIP_POSITION_IDS, CheckpointError, read_checkpoint
from ldm.model.presets import load_config
from ldm.weights.loading import load_model
from ldm.weights.layout import to_original
from ldm.model.clip import EOT, SOT, CLIPTextConfig, FrozenCLIPEmbedder, tokenize
from ldm.weights.convert import convert
from ldm.apps.convert import summary
from ldm.weights.detect import guess_config
from ldm.model.diffusion import LatentDiffusion
from test_parity_unet import build_pair as unet_pair, compare as unet_compare, inputs as unet_inputs

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

V1 = os.path.join(ROOT, "configs", "stable-diffusion", "v1-inference.yaml")
V1_NATIVE = os.path.join(ROOT, "configs", "stable-diffusion", "v1-inference_native_mha.yaml")
V1_TINY = os.path.join(ROOT, "configs", "tiny", "v1-tiny.yaml")
TOL = 1e-4  # max|ours - reference| / max|reference|, fp32
LONG = ", ".join(["a highly detailed matte painting of a castle on a hill at sunset"] * 8)  # > 77 tokens
PROMPTS = ["a professional photograph of an astronaut riding a horse", "", "  Mixed CASE,   extra  spaces!! ",
           "Tom &amp; Jerry don't (won't) fight; 1234 + 5 = 1239 ?!", "café naïve über straße 東京 🙂",
           "before <|endoftext|> after", LONG]


def random_checkpoint_script():
    """ldm.apps.random_checkpoint (scripts/make_random_checkpoint.py's code)."""
    from ldm.apps import random_checkpoint
    return random_checkpoint


# ----------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def hf_tokenizer():
    """transformers' CLIPTokenizer over open_clip's BPE tables, named as openai/clip-vit-large-patch14's vocab."""
    from open_clip.tokenizer import SimpleTokenizer
    tok = SimpleTokenizer()
    vocab = dict(tok.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def hf_tokens(hf_tokenizer, prompts, max_length: int = 77) -> torch.Tensor:
    """What the original FrozenCLIPEmbedder.forward asks the tokenizer for.

    The original ran transformers 4.19's slow CLIPTokenizer, which cleans text with ``ftfy.fix_text``
    (both original environments install ftfy); transformers 5 has only the fast tokenizer, which skips
    ftfy (it differs on e.g. "&amp;"), so ftfy is applied here first, as the slow tokenizer did.
    """
    import ftfy
    prompts = [ftfy.fix_text(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
    return hf_tokenizer(prompts, truncation=True, max_length=max_length, return_length=True,
                        return_overflowing_tokens=False, padding="max_length", return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("max_length", [77, 12])
def test_tokenizer_matches_transformers(hf_tokenizer, max_length):
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (SOT, EOT, EOT)
    ours = tokenize(PROMPTS, max_length)
    want = hf_tokens(hf_tokenizer, PROMPTS, max_length)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), max_length)
    for i, prompt in enumerate(PROMPTS):
        assert ours[i].tolist() == want[i].tolist(), prompt
    # ftfy changes only the html entity here: every other prompt matches transformers 5 with no help.
    plain = hf_tokenizer(PROMPTS, truncation=True, max_length=max_length, padding="max_length",
                         return_tensors="pt")["input_ids"]
    differs = [p for i, p in enumerate(PROMPTS) if plain[i].tolist() != ours[i].tolist()]
    assert differs == [PROMPTS[3]], differs


def test_tokenizer_truncates_and_pads_with_eot(hf_tokenizer):
    long = tokenize([LONG, "a cat"])
    assert len(hf_tokenizer(LONG)["input_ids"]) > 77  # really truncated
    assert long[0, 0] == SOT and long[0, -1] == EOT and (long[0, 1:-1] != EOT).all()
    assert long[1, :4].tolist() == [SOT, 320, 2368, EOT] and (long[1, 4:] == EOT).all()  # "a"=320, "cat"=2368
    # open_clip's own tokenize pads with 0 (and html-unescapes); same ids up to the first EOT otherwise.
    import open_clip
    oc = open_clip.tokenize(["a cat"])
    assert oc[0, :4].tolist() == long[1, :4].tolist() and (oc[0, 4:] == 0).all()


# ----------------------------------------------------------------------------- text encoder

def hf_text_model(cfg: CLIPTextConfig, seed: int):
    """transformers' CLIPTextModel of the same shape (SD 1.x's config: quick_gelu, argmax pooling), re-randomised."""
    hf_cfg = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
        num_attention_heads=cfg.heads, num_hidden_layers=cfg.layers, max_position_embeddings=cfg.context_length,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(transformers.CLIPTextModel(hf_cfg), seed).eval()


def ckpt_key(hf_key: str) -> str:
    """transformers' CLIPTextModel key -> ours (= the SD 1.x checkpoint's, less ``cond_stage_model.``).

    transformers 5 dropped the ``text_model.`` level that 4.x (which wrote the SD 1.x checkpoints) had.
    """
    return "transformer." + (hf_key if hf_key.startswith("text_model.") else "text_model." + hf_key)


def text_pair(cfg: CLIPTextConfig, seed: int = 1):
    """(ours, transformers' model): ours built on meta and given the reference's tensors by name."""
    theirs = hf_text_model(cfg, seed)
    sd = {ckpt_key(k): v for k, v in theirs.state_dict().items() if not k.endswith("position_ids")}
    return load_on_meta(lambda: FrozenCLIPEmbedder(cfg), sd), theirs


def hf_reference(theirs, tokens: torch.Tensor, layer: str, layer_idx: int | None) -> torch.Tensor:
    """The original FrozenCLIPEmbedder.forward after tokenization."""
    out = theirs(input_ids=tokens, output_hidden_states=layer == "hidden")
    if layer == "last":
        return out.last_hidden_state
    if layer == "pooled":
        return out.pooler_output[:, None, :]
    return out.hidden_states[layer_idx]


LAYER_CASES = [("last", None), ("pooled", None), ("hidden", -2), ("hidden", 1), ("hidden", 0)]


def text_compare(ours, theirs, hf_tokenizer, layer, layer_idx, small_norms: bool = False) -> float:
    ours.layer, ours.layer_idx = layer, layer_idx  # read at each call, as the original's attributes
    tokens = hf_tokens(hf_tokenizer, PROMPTS)
    with torch.no_grad(), small_norm_inputs(ours, theirs, factor=1e-3 if small_norms else 1.0) as n:
        assert n[0] == n[1], f"norm count differs: ours {n[0]}, transformers {n[1]}"
        want = hf_reference(theirs, tokens, layer, layer_idx)
        got = ours.encode(PROMPTS)  # our tokenizer, checked equal above
    return rel_err(got, want)


@pytest.fixture(scope="module")
def tiny_text_pair():
    return text_pair(load_config(V1_TINY).text)


@pytest.mark.parametrize("small_norms", [False, True])
@pytest.mark.parametrize("layer,layer_idx", LAYER_CASES)
def test_tiny_clip_text_matches_transformers(tiny_text_pair, hf_tokenizer, layer, layer_idx, small_norms,
                                             record_property):
    rel = text_compare(*tiny_text_pair, hf_tokenizer, layer, layer_idx, small_norms)
    record_property("rel_err", rel)
    assert rel <= TOL, rel


@pytest.mark.slow
@pytest.mark.parametrize("layer,layer_idx", [("last", None), ("hidden", -2)])
def test_full_vit_l14_text_matches_transformers(hf_tokenizer, layer, layer_idx, record_property):
    cfg = load_config(V1).text
    assert (cfg.width, cfg.heads, cfg.layers, cfg.layer) == (768, 12, 12, "last")
    rel = text_compare(*text_pair(cfg), hf_tokenizer, layer, layer_idx)
    record_property("rel_err", rel)
    assert rel <= TOL, rel


def test_clip_config_params():
    cfg = CLIPTextConfig.from_params({"version": "openai/clip-vit-large-patch14", "device": "cuda", "freeze": True,
                                      "max_length": 77, "layer": "hidden", "layer_idx": -2})
    assert (cfg.width, cfg.heads, cfg.layers, cfg.blocks_run) == (768, 12, 12, 11)
    assert CLIPTextConfig.from_params({}).blocks_run == 12
    assert CLIPTextConfig.from_params({"layer": "hidden", "layer_idx": 3}).blocks_run == 3
    for params, match in [({"version": "nope/clip"}, "unknown version"), ({"layer": "penultimate"}, "layer_idx: -2"),
                          ({"layer": "hidden"}, "layer_idx"), ({"layer": "hidden", "layer_idx": 13}, "layer_idx"),
                          ({"width": 64}, "version: custom"), ({"version": "custom", "width": 64}, "heads, layers"),
                          ({"max_length": 78}, "max_length"), ({"bogus": 1}, "unknown config key")]:
        with pytest.raises(ValueError, match=match):
            CLIPTextConfig.from_params(params)


# ----------------------------------------------------------------------------- UNet

@pytest.mark.parametrize("mode", ["plain", "small_norm_inputs"])
def test_tiny_sd1_unet_matches_diffusers(mode, record_property):
    cfg = load_config(V1_TINY).unet
    assert not cfg.use_linear_in_transformer and [cfg.heads_at(c) for c in (32, 64)] == [(2, 16), (2, 32)]
    ours, theirs = unet_pair(cfg, seed=1)
    rel = unet_compare(ours, theirs, *unet_inputs(cfg, 8, 12), mode)
    record_property("rel_err", rel)
    assert rel <= TOL, rel


@pytest.mark.slow
def test_full_sd1_unet_matches_diffusers(record_property):
    cfg = load_config(V1).unet
    assert (cfg.context_dim, cfg.num_heads, cfg.use_linear_in_transformer) == (768, 8, False)
    assert [cfg.heads_at(320 * m)[1] for m in (1, 2, 4)] == [40, 80, 160]
    pair = list(unet_pair(cfg, seed=1))
    try:
        rel = unet_compare(*pair, *unet_inputs(cfg, 16, 24), "plain")
    finally:
        pair.clear()
        gc.collect()
    record_property("rel_err", rel)
    assert rel <= TOL, rel


# ----------------------------------------------------------------------------- original checkpoints end to end

def references_from_checkpoint(sd: dict[str, torch.Tensor], cfg):
    """transformers' CLIPTextModel and diffusers' UNet holding the checkpoint's (original layout) weights."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from test_parity_unet import diffusers_config
    text = hf_text_model(cfg.text, 0)  # built for real: its position_ids buffer is not in a state dict
    text.load_state_dict({k: sd["cond_stage_model." + ckpt_key(k)] for k in text.state_dict()}, strict=True)
    config = diffusers_config(cfg.unet)
    unet = load_on_meta(lambda: diffusers.UNet2DConditionModel(**config), convert_ldm_unet_checkpoint(sd, config))
    return text, unet


def check_end_to_end(model, ckpt: str, hf_tokenizer, h: int, w: int) -> tuple[float, float]:
    """(rel error of get_learned_conditioning, of apply_model) against the references built from ``ckpt``."""
    sd, _ = read_checkpoint(ckpt)
    text, unet = references_from_checkpoint(sd, model.cfg)
    prompts = PROMPTS[:2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.cfg.unet.in_channels, h, w, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        c_ref = text(input_ids=hf_tokens(hf_tokenizer, prompts)).last_hidden_state
        eps_ref = unet(x, t, encoder_hidden_states=c_ref).sample
        c = model.get_learned_conditioning(prompts)
        eps = model.apply_model(x, t, c)
    return rel_err(c, c_ref), rel_err(eps, eps_ref)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1") / "tiny_sd1_original.ckpt"
    random_checkpoint_script().make_random_checkpoint(str(path), V1_TINY, progress=False)
    return path


def test_random_sd1_checkpoint_is_original_layout_with_position_ids(tiny_ckpt):
    sd, _ = read_checkpoint(tiny_ckpt)
    assert CLIP_POSITION_IDS in sd and sd[CLIP_POSITION_IDS].tolist() == [list(range(77))]
    assert any(k.endswith("attn1.to_q.weight") for k in sd) and not any(k.endswith("in_proj_weight") for k in sd)
    assert sd["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.bias"].abs().sum() > 0


def test_tiny_sd1_original_checkpoint_end_to_end(tiny_ckpt, hf_tokenizer, record_property):
    model, report = load_model(V1_TINY, tiny_ckpt)
    assert report.layout == "original" and report.converted
    assert isinstance(model.cond_stage_model, FrozenCLIPEmbedder)
    errs = check_end_to_end(model, tiny_ckpt, hf_tokenizer, 8, 12)
    record_property("rel_err", errs)
    assert max(errs) <= TOL, errs


def test_tiny_sd1_ema_covers_only_the_unet(tiny_ckpt, tmp_path):
    sd, _ = read_checkpoint(tiny_ckpt)
    ema = {f"model_ema.{k[len('model.'):].replace('.', '')}": torch.randn_like(v)
           for k, v in sd.items() if k.startswith("model.")}
    assert all(k.startswith("model_ema.diffusion_model") for k in ema)
    path = tmp_path / "with_ema.ckpt"
    torch.save({"state_dict": {**sd, **ema, "model_ema.decay": torch.tensor(0.9999),
                               "model_ema.num_updates": torch.tensor(10)}}, path)
    live, _ = load_model(V1_TINY, path)
    averaged, _ = load_model(V1_TINY, path, ema=True)
    key = "diffusion_model.out.2.weight"
    assert torch.equal(averaged.model.state_dict()[key], ema["model_ema.diffusion_modelout2weight"])
    assert torch.equal(live.model.state_dict()[key], sd[f"model.{key}"])
    text = "transformer.text_model.final_layer_norm.weight"
    assert torch.equal(averaged.cond_stage_model.state_dict()[text], live.cond_stage_model.state_dict()[text])


def test_v1_inference_yaml_builds_sd1():
    cfg = load_config(V1)
    assert isinstance(cfg.text, CLIPTextConfig) and cfg.text.version == "openai/clip-vit-large-patch14"
    assert (cfg.parameterization, cfg.scale_factor, cfg.unet.context_dim, cfg.checkpoint_layout) == \
        ("eps", 0.18215, 768, "original")
    assert load_config(V1_NATIVE).checkpoint_layout == "native_mha"
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    n_text = sum(p.numel() for p in model.cond_stage_model.parameters())
    # Published sizes: the CLIP ViT-L/14 text tower and the SD 1.x UNet (ours adds the zero Q/K/V biases).
    n_unet = sum(p.numel() for n, p in model.model.named_parameters() if not n.endswith("in_proj_bias"))
    assert (n_text, n_unet) == (123_060_480, 859_520_964)


@pytest.mark.slow
def test_full_sd1_original_checkpoint_end_to_end(tmp_path, hf_tokenizer, record_property):
    need_disk(tmp_path, 4.3 + 0.5)  # the float32 .ckpt, 4.3 GB
    ckpt = tmp_path / "sd1_original.ckpt"
    random_checkpoint_script().make_random_checkpoint(str(ckpt), V1, progress=False)
    assert guess_config(read_checkpoint(ckpt)[0], ckpt.name)[0] == V1
    model, report = load_model(V1, ckpt)
    assert report.layout == "original"
    errs = check_end_to_end(model, ckpt, hf_tokenizer, 16, 24)
    record_property("rel_err", errs)
    assert max(errs) <= TOL, errs


# ----------------------------------------------------------------------------- converter

def test_tiny_sd1_converter_round_trip(tiny_ckpt, tmp_path):
    native = tmp_path / "native.safetensors"
    back = tmp_path / "back.ckpt"
    report = convert(tiny_ckpt, native, to="native", check=True, config=V1_TINY, progress=False)
    assert report.max_diff == 0.0 and report.family == "tiny SD1-shaped test model, context width 64"
    assert any("predicts eps: use configs/tiny/v1-tiny.yaml" in line for line in summary(report))
    convert(native, back, to="original", progress=False)
    src, mid, out = (read_checkpoint(p)[0] for p in (tiny_ckpt, native, back))
    assert any(k.endswith("attn1.in_proj_weight") for k in mid) and CLIP_POSITION_IDS in mid
    assert set(out) == set(src)
    assert all(torch.equal(out[k], src[k]) for k in src)
    clip = [k for k in src if k.startswith("cond_stage_model.")]
    assert clip and all(torch.equal(mid[k], src[k]) for k in clip)  # CLIP keys pass through unchanged
    a, b = (load_model(V1_TINY, p)[0].state_dict() for p in (tiny_ckpt, native))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- guess_config

def meta_state_dict(config: str, layout: str = "original") -> dict[str, torch.Tensor]:
    """The state dict (meta tensors: only shapes) of a config's model, in either layout."""
    from ldm.model.diffusion import model_class
    cfg = load_config(config)
    with torch.device("meta"):
        sd = model_class(cfg)(cfg).state_dict()
    return to_original(sd) if layout == "original" else sd


def repo(path: str) -> str:
    return os.path.join(ROOT, path)


@pytest.mark.parametrize("layout", ["original", "native_mha"])
def test_guess_tiny_families(layout):
    for config, want in [("configs/tiny/v1-tiny.yaml", "configs/tiny/v1-tiny.yaml"),
                         ("configs/tiny/v2-tiny.yaml", "configs/tiny/v2-tiny-v.yaml"),
                         ("configs/tiny/v2-tiny-inpainting.yaml", "configs/tiny/v2-tiny-inpainting.yaml")]:
        path, message = guess_config(meta_state_dict(repo(config), layout))
        assert path == repo(want), (config, message)
        assert f"{layout} layout" in message and "\n" not in message


@pytest.mark.parametrize("layout", ["original", "native_mha"])
def test_guess_full_sd1(layout):
    sd = meta_state_dict(V1, layout)
    sd[CLIP_POSITION_IDS] = torch.arange(77)[None]
    path, message = guess_config(sd)
    assert path == (V1 if layout == "original" else V1_NATIVE)
    assert message.startswith("detected SD 1.x") and "assumed" not in message


@pytest.mark.parametrize("layout", ["original", "native_mha"])
def test_guess_full_sd2_assumes_v_and_says_how_to_override(layout):
    sd = meta_state_dict(repo("configs/stable-diffusion/v2-inference.yaml"), layout)
    suffix = "_native_mha" if layout == "native_mha" else ""
    v, eps = (repo(f"configs/stable-diffusion/v2-inference{p}{suffix}.yaml") for p in ("-v", ""))
    path, message = guess_config(sd)
    assert path == v and "assumed v-prediction" in message
    assert f"--config configs/stable-diffusion/v2-inference{suffix}.yaml" in message
    assert guess_config(sd, "v2-1_768-ema-pruned.ckpt")[0] == v
    assert guess_config(sd, "/models/512-base-ema.safetensors")[0] == eps
    assert guess_config({"state_dict": sd}, "v2-1_512-ema-pruned.ckpt")[0] == eps  # nested dicts are unwrapped
    # inpainting: 9 input channels
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 9, 3, 3, device="meta")
    path, message = guess_config(sd, "512-inpainting-ema.ckpt")
    assert path == repo(f"configs/stable-diffusion/v2-inpainting-inference{suffix}.yaml") and "assumed" not in message
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 5, 3, 3, device="meta")
    with pytest.raises(CheckpointError, match="depth-to-image checkpoints are not supported"):
        guess_config(sd)


@pytest.mark.parametrize("layout", ["original", "native_mha"])
def test_guess_full_sd1_inpainting(layout):
    from ldm.model.diffusion import LatentInpaintDiffusion
    suffix = "_native_mha" if layout == "native_mha" else ""
    want = repo(f"configs/stable-diffusion/v1-inpainting-inference{suffix}.yaml")
    sd = meta_state_dict(want, layout)
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    path, message = guess_config(sd, "sd-v1-5-inpainting.ckpt")
    assert path == want and message.startswith("detected SD 1.x inpainting") and "assumed" not in message
    cfg = load_config(path)
    with torch.device("meta"):
        model = LatentInpaintDiffusion(cfg)
    assert isinstance(model.cond_stage_model, FrozenCLIPEmbedder) and cfg.conditioning_key == "hybrid"


def test_guess_rejects_what_it_cannot_load():
    sd1 = meta_state_dict(V1)
    first = "model.diffusion_model.input_blocks.0.0.weight"
    cases = [
        ({**sd1, first: torch.empty(320, 5, 3, 3, device="meta")}, "5 input channels"),
        ({k: v for k, v in sd1.items() if not k.startswith("cond_stage_model.")}, "no text encoder"),
        ({**sd1, "cond_stage_model.model.ln_final.weight": torch.empty(1024, device="meta")}, "more than one model kind"),
        ({k: v for k, v in sd1.items() if k.startswith("first_stage_model.")}, "not an ldm Stable Diffusion"),
        # SD 1's text encoder beside SDXL's first tower: two kinds of text encoder
        ({**sd1, "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight":
          torch.empty(49408, 768, device="meta")}, "more than one model kind"),
        ({**sd1, "model.diffusion_model.label_emb.0.0.weight": torch.empty(1)}, "label_emb"),
        ({**sd1, first: torch.empty(192, 4, 3, 3, device="meta")}, "UNet width 192"),
    ]
    for sd, match in cases:
        with pytest.raises(CheckpointError, match=match):
            guess_config(sd)


def test_guessed_config_loads_the_checkpoint(tiny_ckpt):
    path, _ = guess_config(read_checkpoint(tiny_ckpt)[0], str(tiny_ckpt))
    model, _ = load_model(path, tiny_ckpt)
    assert isinstance(model.cond_stage_model, FrozenCLIPEmbedder)


def test_make_random_checkpoint_model_option(tmp_path, monkeypatch):
    script = random_checkpoint_script()
    configs = []

    def fake(out, config, *args, **kwargs):
        configs.append(config)
        open(out, "wb").close()

    monkeypatch.setattr(script, "make_random_checkpoint", fake)
    out = str(tmp_path / "x.ckpt")
    for argv in ([out, "--model", "sd1"], [out], [out, "--config", V1_TINY, "--model", "sd1"]):
        assert script.main([*argv, "--quiet"]) == 0
    assert configs == [V1, os.path.join(ROOT, "configs", "stable-diffusion", "v2-inference.yaml"), V1_TINY]
