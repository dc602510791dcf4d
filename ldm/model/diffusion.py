"""Inference-only LatentDiffusion: UNet + VAE + text conditioning + the noise schedule buffers.

Built explicitly from a typed ``DiffusionConfig``; the original yaml's ``model.params`` block is
one way to make that config (``LatentDiffusion(**params)``, which is what
``instantiate_from_config`` calls). The original public API is kept: ``apply_model``,
``get_learned_conditioning``, ``decode_first_stage``, ``encode_first_stage``,
``get_first_stage_encoding``, ``ema_scope``, ``model.diffusion_model``, ``first_stage_model``,
``cond_stage_model``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import nn

from ldm.model.config import take_params, to_plain
from ldm.model.schedule import BUFFER_NAMES, make_betas, schedule_buffers
from ldm.model.clip import CLIPTextConfig, FrozenCLIPEmbedder
from ldm.model.openclip import FrozenOpenCLIPEmbedder, TextConfig
from ldm.model.unet import UNetConfig, UNetModel
from ldm.model.vae import AutoencoderKL, DiagonalGaussianDistribution, VAEConfig

UNET_TARGETS = {"ldm.modules.diffusionmodules.openaimodel.UNetModel", "ldm.model.unet.UNetModel"}
VAE_TARGETS = {"ldm.models.autoencoder.AutoencoderKL", "ldm.model.vae.AutoencoderKL"}
# cond_stage_config target -> the typed config of that text encoder (OpenCLIP for SD 2.x, CLIP for SD 1.x).
TEXT_TARGETS = {"ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": TextConfig,
                "ldm.model.openclip.FrozenOpenCLIPEmbedder": TextConfig,
                "ldm.modules.encoders.modules.FrozenCLIPEmbedder": CLIPTextConfig,
                "ldm.model.clip.FrozenCLIPEmbedder": CLIPTextConfig}
LAYOUTS = ("original", "native_mha")
CONDITIONING_KEYS = ("crossattn", "hybrid")  # hybrid: x concatenated with c_concat, plus cross-attention

_IGNORED = {"base_learning_rate", "num_timesteps_cond", "log_every_t", "first_stage_key", "cond_stage_key",
            "cond_stage_trainable", "monitor", "use_ema", "scale_by_std", "ckpt_path", "ignore_keys",
            "load_only_unet", "loss_type", "original_elbo_weight", "l_simple_weight", "learn_logvar", "logvar_init",
            "use_positional_encodings", "clip_denoised", "v_posterior", "concat_mode", "cond_stage_forward",
            "make_it_fit", "reset_ema", "reset_num_ema_updates", "unet_trainable", "scheduler_config",
            "lr_scheduler_config", "force_null_conditioning", "image_size", "channels"}
_KNOWN = {"linear_start", "linear_end", "timesteps", "beta_schedule", "cosine_s", "parameterization",
          "scale_factor", "conditioning_key", "unet_config", "first_stage_config", "cond_stage_config",
          "checkpoint_layout"}


def _sub(owner: str, node: dict, targets: set[str]) -> dict:
    target = node.get("target")
    if target not in targets:
        raise ValueError(f"{owner}: target {target!r} is not supported here (expected one of {sorted(targets)})")
    return node.get("params") or {}


@dataclass(frozen=True)
class DiffusionConfig:
    """The model: its three parts and the original ``LatentDiffusion``'s options. A default here is the original's
    default (what a yaml without the key means); the SD models' values are the presets (``ldm.model.presets``)."""
    unet: UNetConfig
    vae: VAEConfig
    text: TextConfig | CLIPTextConfig
    timesteps: int = 1000
    beta_schedule: str = "linear"
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    cosine_s: float = 8e-3
    parameterization: str = "eps"
    scale_factor: float = 1.0
    checkpoint_layout: str = "original"
    conditioning_key: str = "crossattn"  # the only text conditioning of SD (the original's None meant concat)
    concat_keys: tuple[str, ...] = ()    # LatentInpaintDiffusion: the c_concat parts, in channel order
    masked_image_key: str | None = None  # the one of concat_keys that is VAE-encoded (the others are masks)

    @classmethod
    def from_params(cls, params: dict) -> "DiffusionConfig":
        """Map the original yaml's ``model.params``; unknown keys are errors, training-only keys are ignored."""
        p = take_params("LatentDiffusion", to_plain(params), _IGNORED, {}, known=_KNOWN)
        if p.get("conditioning_key", cls.conditioning_key) not in CONDITIONING_KEYS:
            raise ValueError(f"LatentDiffusion: conditioning_key={p['conditioning_key']!r} is not supported "
                             f"(one of {CONDITIONING_KEYS})")
        if p.get("parameterization", cls.parameterization) not in ("eps", "v"):
            raise ValueError(f"LatentDiffusion: parameterization={p['parameterization']!r} is not supported (eps or v)")
        if p.get("checkpoint_layout", cls.checkpoint_layout) not in LAYOUTS:
            raise ValueError(f"LatentDiffusion: checkpoint_layout={p['checkpoint_layout']!r} (expected one of {LAYOUTS})")
        missing = [k for k in ("unet_config", "first_stage_config", "cond_stage_config") if k not in p]
        if missing:
            raise ValueError(f"LatentDiffusion: missing config key(s) {', '.join(missing)}")
        unet, vae, text = p.pop("unet_config"), p.pop("first_stage_config"), p.pop("cond_stage_config")
        return cls(unet=UNetConfig.from_params(_sub("unet_config", unet, UNET_TARGETS)),
                   vae=VAEConfig.from_params(_sub("first_stage_config", vae, VAE_TARGETS)),
                   text=TEXT_TARGETS.get(text.get("target"), TextConfig).from_params(  # _sub rejects others
                       _sub("cond_stage_config", text, TEXT_TARGETS)),
                   **p)  # keys the yaml leaves out take the dataclass defaults: one set of defaults

    def betas(self) -> torch.Tensor:
        """float64 CPU betas of this model's training schedule."""
        return make_betas(self.beta_schedule, self.timesteps, self.linear_start, self.linear_end, self.cosine_s)


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (the checkpoint prefix ``model.diffusion_model.``).

    "crossattn": UNet(x, t, context); "hybrid" (inpainting): UNet(cat([x, *c_concat], channels), t, context).
    """

    def __init__(self, unet: UNetModel, conditioning_key: str = "crossattn"):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key={conditioning_key!r} is not supported (one of {CONDITIONING_KEYS})")
        self.diffusion_model = unet
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: list[torch.Tensor] | None = None,
                c_crossattn: list[torch.Tensor] | None = None, **caching) -> torch.Tensor:
        """UNet output (B, C, H, W) for x (B, C, H, W); c_concat entries are (B, C_i, H, W).

        ``caching``: the UNet's DeepCache/T-GATE arguments (``UNetModel.forward``), passed through."""
        if self.conditioning_key == "hybrid":
            if not c_concat:
                raise ValueError("hybrid conditioning needs c_concat (e.g. the inpainting mask and masked-image latent)")
            x = torch.cat([x, *c_concat], 1)  # (B, C + sum C_i, H, W)
        context = c_crossattn[0] if len(c_crossattn) == 1 else torch.cat(c_crossattn, 1)
        return self.diffusion_model(x, t, context, **caching)


class InferenceModel(nn.Module):
    """What LatentDiffusion and SDXL's DiffusionEngine share: device and dtype from the UNet, eval mode always."""

    @property
    def device(self) -> torch.device:
        return self.model.diffusion_model.time_embed[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.diffusion_model.dtype

    def train(self, mode: bool = True):
        """Inference only: the model always stays in eval mode (no dropout exists anyway)."""
        return super().train(False)

    @contextlib.contextmanager
    def ema_scope(self, context: str | None = None):
        """No-op: EMA weights, when wanted, are chosen at load time (``load_model(..., ema=True)``)."""
        yield


class LatentDiffusion(InferenceModel):
    """Text-to-image latent diffusion for inference (SD 2.x: OpenCLIP text, eps or v prediction)."""

    def __init__(self, cfg: DiffusionConfig | None = None, **params):
        super().__init__()
        cfg = cfg if cfg is not None else DiffusionConfig.from_params(params)
        self.cfg = cfg
        self.parameterization = cfg.parameterization
        self.scale_factor = cfg.scale_factor
        self.num_timesteps = cfg.timesteps
        self.channels = cfg.unet.in_channels
        self.model = DiffusionWrapper(UNetModel(cfg.unet), cfg.conditioning_key)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        text_encoder = FrozenCLIPEmbedder if isinstance(cfg.text, CLIPTextConfig) else FrozenOpenCLIPEmbedder
        self.cond_stage_model = text_encoder(cfg.text)
        # Real CPU tables even when the model is built under torch.device("meta"): a checkpoint
        # without them (they are derived data) still loads.
        with torch.device("cpu"):
            for name, value in schedule_buffers(cfg.betas()).items():
                self.register_buffer(name, value)
        self.eval()
        self.requires_grad_(False)

    # ----- the original public API -----
    @torch.no_grad()
    def get_learned_conditioning(self, c):
        """Prompts (list of str) -> (B, 77, D) cross-attention context."""
        return self.cond_stage_model.encode(c)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond, return_ids: bool = False, **caching):
        """UNet output (eps or v) for latents x_noisy at timesteps t.

        ``cond``: the text context (or a list of them), or the original's dict
        ``{"c_concat": [...], "c_crossattn": [...]}`` that hybrid (inpainting) models need. ``caching``: the
        UNet's feature-caching arguments (``UNetModel.forward``; then a tuple comes back), not the original's.
        """
        c_concat = None
        if isinstance(cond, dict):
            c_concat, cond = cond.get("c_concat"), cond["c_crossattn"]
        if not isinstance(cond, list):
            cond = [cond]
        return self.model(x_noisy, t, c_concat=c_concat, c_crossattn=cond, **caching)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False):
        """Images in about [-1, 1]; sliced/tiled per ``first_stage_model.set_memory_savers``; a reduced-precision
        decode that overflows is redone in fp32 with a warning (``AutoencoderKL.decode_checked``)."""
        return self.first_stage_model.decode_checked(z / self.scale_factor)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior, generator: torch.Generator | None = None):
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type {type(encoder_posterior).__name__} is not supported")
        return self.scale_factor * z

    def _at(self, table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return table.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start + \
            self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_alphas_cumprod, t, x_t) * x_t - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_alphas_cumprod, t, x_t) * v + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t


# ----- inpainting (the original LatentInpaintDiffusion, inference only) -----

INPAINT_TARGETS = {"ldm.models.diffusion.ddpm.LatentInpaintDiffusion", "ldm.model.diffusion.LatentInpaintDiffusion"}
# LatentFinetuneDiffusion's training-time options: re-shaping input weights of a txt2img checkpoint, logging
_INPAINT_IGNORED = {"finetune_keys", "keep_finetune_dims", "c_concat_log_start", "c_concat_log_end"}


def inpaint_config(params: dict) -> DiffusionConfig:
    """Map ``LatentInpaintDiffusion``'s yaml params: hybrid conditioning over [x, mask, masked-image latent]."""
    p = {k: v for k, v in to_plain(params).items() if k not in _INPAINT_IGNORED}
    concat_keys = tuple(p.pop("concat_keys", ("mask", "masked_image")))
    masked = p.pop("masked_image_key", "masked_image")
    if masked not in concat_keys or len(concat_keys) != 2:
        raise ValueError(f"LatentInpaintDiffusion: concat_keys={list(concat_keys)} must be a mask key and "
                         f"masked_image_key {masked!r}")
    cfg = DiffusionConfig.from_params(p)
    if cfg.conditioning_key != "hybrid":
        raise ValueError(f"LatentInpaintDiffusion: conditioning_key={cfg.conditioning_key!r} (only 'hybrid')")
    want = 2 * cfg.vae.embed_dim + 1  # latent + masked-image latent + one mask channel
    if cfg.unet.in_channels != want or cfg.unet.out_channels != cfg.vae.embed_dim:
        raise ValueError(f"LatentInpaintDiffusion: the UNet needs in_channels={want} and out_channels="
                         f"{cfg.vae.embed_dim} (got {cfg.unet.in_channels} and {cfg.unet.out_channels})")
    return replace(cfg, concat_keys=concat_keys, masked_image_key=masked)


class LatentInpaintDiffusion(LatentDiffusion):
    """SD 2 inpainting: the UNet sees cat([x, mask, masked-image latent]) (9 channels) and the text context.

    ``c_concat`` is built in ``concat_keys`` order (ldm.apps.pipelines.inpaint_conditioning): the mask resized to
    the latent size, and the VAE latent of the image with the repainted region zeroed.
    """

    def __init__(self, cfg: DiffusionConfig | None = None, **params):
        cfg = cfg if cfg is not None else inpaint_config(params)
        if cfg.conditioning_key != "hybrid" or cfg.masked_image_key not in cfg.concat_keys:
            raise ValueError("LatentInpaintDiffusion needs a hybrid config with concat_keys (see inpaint_config)")
        super().__init__(cfg)

    @property
    def concat_keys(self) -> tuple[str, ...]:
        return self.cfg.concat_keys

    @property
    def masked_image_key(self) -> str:
        return self.cfg.masked_image_key

    @torch.no_grad()
    def get_unconditional_conditioning(self, batch_size: int, null_label: str = "") -> torch.Tensor:
        """(batch_size, 77, D) context of ``null_label``, the unconditional half of classifier-free guidance."""
        return self.get_learned_conditioning(batch_size * [null_label])


def model_config(target: str, params: dict) -> DiffusionConfig:
    """The typed config of a yaml ``model`` node: LatentDiffusion or LatentInpaintDiffusion params."""
    if target in INPAINT_TARGETS:
        return inpaint_config(params)
    return DiffusionConfig.from_params(params)


def model_class(cfg: DiffusionConfig) -> type[LatentDiffusion]:
    """The class that runs ``cfg``: LatentInpaintDiffusion for inpainting configs, else LatentDiffusion."""
    return LatentInpaintDiffusion if cfg.concat_keys else LatentDiffusion


__all__ = ["LatentDiffusion", "LatentInpaintDiffusion", "DiffusionConfig", "DiffusionWrapper", "BUFFER_NAMES",
           "inpaint_config", "model_config", "model_class"]
