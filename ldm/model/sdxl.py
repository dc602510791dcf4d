"""SDXL for inference (generative-models' ``DiffusionEngine``): UNet + VAE + ``GeneralConditioner`` + the discrete
denoiser's sigma table.

Built explicitly from a typed ``SDXLConfig``; the ``model.params`` block of generative-models' yamls
(``configs/sdxl/sd_xl_base.yaml``) is one way to make that config (``DiffusionEngine(**params)``, which is what
``instantiate_from_config`` calls for ``target: sgm.models.diffusion.DiffusionEngine``). Attribute names follow
the released checkpoint keys: ``model.diffusion_model.*``, ``first_stage_model.*``, ``conditioner.embedders.N.*``,
``denoiser.sigmas``. The sampler-facing pieces are sgm's small ones: the discretization gives sigmas
(``legacy_ddpm_sigmas``), the scaling gives (c_skip, c_out, c_in, c_noise) (``eps_scaling``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ldm.model.conditioner import TEXT_KEY, ConditionerConfig, GeneralConditioner
from ldm.model.config import take_params, to_plain
from ldm.model.diffusion import InferenceModel
from ldm.model.schedule import make_betas, schedule_buffers
from ldm.model.unet import UNetConfig, UNetModel
from ldm.model.vae import AutoencoderKL, DiagonalGaussianDistribution, VAEConfig

ENGINE_TARGETS = {"sgm.models.diffusion.DiffusionEngine", "ldm.model.sdxl.DiffusionEngine"}
UNET_TARGETS = {"sgm.modules.diffusionmodules.openaimodel.UNetModel", "ldm.model.unet.UNetModel"}
VAE_TARGETS = {"sgm.models.autoencoder.AutoencoderKL", "ldm.model.vae.AutoencoderKL"}
CONDITIONER_TARGETS = {"sgm.modules.GeneralConditioner", "ldm.model.conditioner.GeneralConditioner"}
DENOISER_TARGETS = {"sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "ldm.model.sdxl.DiscreteDenoiser"}
SCALINGS = {"sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling": "eps", "ldm.model.sdxl.EpsScaling": "eps"}
DISCRETIZATIONS = {"sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization",
                   "ldm.model.sdxl.LegacyDDPMDiscretization"}
BUFFER_NAMES = ("denoiser.sigmas",)  # derived from the config: a released file may lack it

# DiffusionEngine's training-only keys and its options that change nothing at inference here
# (disable_first_stage_autocast: the VAE always runs in its own dtype, as that option asks).
_IGNORED = {"optimizer_config", "scheduler_config", "loss_fn_config", "ckpt_path", "use_ema", "ema_decay_rate",
            "input_key", "log_keys", "no_cond_log", "compile_model", "en_and_decode_n_samples_a_time",
            "disable_first_stage_autocast"}
_KNOWN = {"network_config", "denoiser_config", "first_stage_config", "conditioner_config", "scale_factor"}


def _sub(owner: str, node: Any, targets: set[str]) -> dict:
    node = to_plain(node or {})
    if node.get("target") not in targets:
        raise ValueError(f"{owner}: target {node.get('target')!r} is not supported here "
                         f"(expected one of {sorted(targets)})")
    return node.get("params") or {}


@dataclass(frozen=True)
class DenoiserConfig:
    """``DiscreteDenoiser`` over ``LegacyDDPMDiscretization`` (sgm's defaults: SD's 1,000-step linear schedule)
    with ``EpsScaling``: the UNet predicts eps and is called with the timestep a sigma maps to."""
    num_idx: int
    scaling: str = "eps"
    linear_start: float = 0.00085
    linear_end: float = 0.0120
    num_timesteps: int = 1000

    @classmethod
    def from_params(cls, params: dict) -> "DenoiserConfig":
        """Map ``DiscreteDenoiser``'s yaml params (its scaling and discretization configs included)."""
        p = take_params("DiscreteDenoiser", params, set(), {"do_append_zero": False, "quantize_c_noise": True,
                                                           "flip": True},
                        known={"num_idx", "scaling_config", "discretization_config"})
        if "num_idx" not in p:
            raise ValueError("DiscreteDenoiser: missing config key num_idx")
        scaling = to_plain(p.get("scaling_config") or {})
        if scaling.get("target") not in SCALINGS or scaling.get("params"):
            raise ValueError(f"DiscreteDenoiser: scaling {scaling.get('target')!r} is not supported (EpsScaling)")
        disc = to_plain(p.get("discretization_config") or {})
        if disc.get("target") not in DISCRETIZATIONS:
            raise ValueError(f"DiscreteDenoiser: discretization {disc.get('target')!r} is not supported "
                             "(LegacyDDPMDiscretization)")
        d = take_params("LegacyDDPMDiscretization", disc.get("params"), set(), {},
                        known={"linear_start", "linear_end", "num_timesteps"})
        if p["num_idx"] != d.get("num_timesteps", cls.num_timesteps):
            raise ValueError("DiscreteDenoiser: num_idx must equal the discretization's num_timesteps")
        return cls(num_idx=p["num_idx"], scaling=SCALINGS[scaling["target"]], **d)

    def sigmas(self) -> torch.Tensor:
        """(num_idx,) float32 CPU sigmas, ascending with the timestep (sgm's ``denoiser.sigmas``)."""
        return legacy_ddpm_sigmas(self.linear_start, self.linear_end, self.num_timesteps)


def legacy_ddpm_sigmas(linear_start: float, linear_end: float, n: int) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of SD's DDPM schedule, t = 0 ... n-1, float32 as sgm."""
    alpha_bar = torch.cumprod(1.0 - make_betas("linear", n, linear_start, linear_end), 0)  # float64
    return ((1 - alpha_bar) / alpha_bar).to(torch.float32) ** 0.5


def eps_scaling(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) of an eps-predicting UNet (sgm's ``EpsScaling``): D(x) = x - sigma eps."""
    return torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1.0) ** 0.5, sigma.clone()


class EpsScaling:
    """sgm's scaling object (``target: ...denoiser_scaling.EpsScaling``): ``EpsScaling()(sigma)``."""

    def __call__(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return eps_scaling(sigma)


class LegacyDDPMDiscretization:
    """sgm's discretization object: ``(n)`` -> the sigmas of n roughly equally spaced timesteps of the 1,000,
    descending, with a final 0 (``do_append_zero``); ``flip`` gives them ascending."""

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.0120, num_timesteps: int = 1000):
        self.sigmas = legacy_ddpm_sigmas(linear_start, linear_end, num_timesteps)  # (num_timesteps,) ascending

    def __call__(self, n: int, do_append_zero: bool = True, device: str | torch.device = "cpu",
                 flip: bool = False) -> torch.Tensor:
        total = len(self.sigmas)
        if n > total:
            raise ValueError(f"LegacyDDPMDiscretization: {n} steps of a {total}-step schedule")
        # sgm's generate_roughly_equally_spaced_steps: numpy's linspace(total - 1, 0, n, endpoint=False) (i * step +
        # start, in float64), truncated to int, ascending
        steps = (torch.arange(n, dtype=torch.float64) * (-(total - 1) / n) + (total - 1)).long().flip(0)
        sigmas = self.sigmas[steps].flip(0)  # descending
        if do_append_zero:
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        return (sigmas.flip(0) if flip else sigmas).to(device)


@dataclass(frozen=True)
class SDXLConfig:
    """SDXL's parts and ``DiffusionEngine``'s options; a default here is sgm's default (what a yaml without the key
    means); SDXL's values are the presets (``ldm.model.presets``)."""
    unet: UNetConfig
    vae: VAEConfig
    conditioner: ConditionerConfig
    denoiser: DenoiserConfig
    scale_factor: float = 1.0

    def __post_init__(self):
        c = self.conditioner
        if (self.unet.context_dim, self.unet.adm_in_channels) != (c.context_dim, c.vector_dim):
            raise ValueError(f"DiffusionEngine: the conditioner gives a {c.context_dim}-wide context and a "
                             f"{c.vector_dim}-wide vector; the UNet takes context_dim {self.unet.context_dim} and "
                             f"adm_in_channels {self.unet.adm_in_channels}")

    @property
    def zeroes_empty_negative(self) -> bool:
        """Whether an empty negative prompt means zeroed text embeddings: yes for the base, no for the refiner
        (the model conditioned on the aesthetic score), whose empty prompt is encoded. generative-models samples the
        base with ``force_uc_zero_embeddings=["txt"]`` and the refiner (``is_legacy: True`` in
        ``scripts/demo/sampling.py``'s VERSION2SPECS and ``sgm/inference/api.py``) without. For the base, diffusers'
        ``force_zeros_for_empty_prompt`` agrees."""
        return "aesthetic_score" not in self.conditioner.input_keys

    @classmethod
    def from_params(cls, params: dict) -> "SDXLConfig":
        """Map generative-models' ``DiffusionEngine`` yaml params; unknown keys are errors."""
        p = take_params("DiffusionEngine", params, _IGNORED, {"network_wrapper": None}, known=_KNOWN)
        missing = [k for k in ("network_config", "denoiser_config", "first_stage_config", "conditioner_config")
                   if k not in p]
        if missing:
            raise ValueError(f"DiffusionEngine: missing config key(s) {', '.join(missing)}")
        unet = UNetConfig.from_params(_sub("network_config", p.pop("network_config"), UNET_TARGETS))
        if unet.num_classes != "sequential":
            raise ValueError("DiffusionEngine: the UNet needs num_classes: sequential (the vector conditioning)")
        return cls(unet=unet,
                   vae=VAEConfig.from_params(_sub("first_stage_config", p.pop("first_stage_config"), VAE_TARGETS)),
                   conditioner=ConditionerConfig.from_params(
                       _sub("conditioner_config", p.pop("conditioner_config"), CONDITIONER_TARGETS)),
                   denoiser=DenoiserConfig.from_params(
                       _sub("denoiser_config", p.pop("denoiser_config"), DENOISER_TARGETS)),
                   **p)


class DiscreteDenoiser(nn.Module):
    """Holds ``sigmas`` (the checkpoint's ``denoiser.sigmas``) and maps between sigmas and timesteps."""

    def __init__(self, cfg: DenoiserConfig | None = None, **params):
        super().__init__()
        cfg = cfg if cfg is not None else DenoiserConfig.from_params(params)
        self.cfg = cfg
        with torch.device("cpu"):  # a real table even under torch.device("meta"): it is derived data
            self.register_buffer("sigmas", cfg.sigmas())

    def sigma_to_idx(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep whose sigma is nearest to each of ``sigma`` (B,)."""
        return (sigma[None] - self.sigmas.to(sigma.device)[:, None]).abs().argmin(dim=0)  # (B,)

    def forward(self, network, x: torch.Tensor, sigma: torch.Tensor, cond: dict, **kwargs) -> torch.Tensor:
        """The denoised x0 estimate D(x; sigma) = c_skip x + c_out network(c_in x, t(sigma), cond) (sgm's)."""
        idx = self.sigma_to_idx(sigma)
        sigma = self.sigmas.to(sigma.device)[idx].reshape(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1), quantized
        c_skip, c_out, c_in, _ = eps_scaling(sigma)
        return network(x * c_in, idx, cond, **kwargs) * c_out + x * c_skip


class SDXLWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (sgm's ``OpenAIWrapper``): UNet(x, t, context=crossattn, y=vector)."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict, **caching) -> torch.Tensor:
        """``caching``: the UNet's DeepCache/T-GATE arguments (``UNetModel.forward``), passed through."""
        return self.diffusion_model(x, t, cond["crossattn"], y=cond["vector"], **caching)


class DiffusionEngine(InferenceModel):
    """SDXL base or refiner for inference: ``conditioner`` -> {crossattn, vector}, ``model`` (the UNet),
    ``first_stage_model`` (the VAE, latents scaled by ``scale_factor`` 0.13025), ``denoiser`` (sigmas)."""

    parameterization = "eps"

    def __init__(self, cfg: SDXLConfig | None = None, **params):
        super().__init__()
        cfg = cfg if cfg is not None else SDXLConfig.from_params(params)
        self.cfg = cfg
        self.scale_factor = cfg.scale_factor
        self.num_timesteps = cfg.denoiser.num_timesteps
        self.channels = cfg.unet.in_channels
        self.model = SDXLWrapper(UNetModel(cfg.unet))
        self.denoiser = DiscreteDenoiser(cfg.denoiser)
        self.conditioner = GeneralConditioner(cfg.conditioner)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        # The DDPM tables of the same schedule for the alpha_bar samplers (DDIM, PLMS, DPM-Solver++); not
        # persistent: the released checkpoint has none of them.
        with torch.device("cpu"):
            betas = make_betas("linear", cfg.denoiser.num_timesteps, cfg.denoiser.linear_start, cfg.denoiser.linear_end)
            for name, value in schedule_buffers(betas).items():
                self.register_buffer(name, value, persistent=False)
        self.eval()
        self.requires_grad_(False)

    @torch.no_grad()
    def get_learned_conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A batch (``ldm.model.conditioner.conditioning_batch``) -> {"crossattn": (B, 77, D), "vector": (B, V)}."""
        return self.conditioner(batch)

    @torch.no_grad()
    def get_unconditional_conditioning(self, batch: dict[str, Any], negative_prompts: list[str],
                                       negative_aesthetic_score: float = 2.5) -> dict[str, torch.Tensor]:
        """The unconditional half of guidance: the batch's sizes with the negative prompts and score (2.5, sgm's).

        For the base, all-empty negative prompts give zeroed text embeddings (context and pooled), as the reference
        samples it (``SDXLConfig.zeroes_empty_negative``); other negative prompts are encoded, as diffusers does
        (sgm's demo offers none for SDXL). The refiner always encodes them.
        """
        uc = {**batch, TEXT_KEY: list(negative_prompts),
              "aesthetic_score": torch.full((len(negative_prompts), 1), float(negative_aesthetic_score))}
        empty = all(p == "" for p in negative_prompts)
        zero = (TEXT_KEY,) if empty and self.cfg.zeroes_empty_negative else ()
        return self.conditioner(uc, force_zero_embeddings=zero)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict, **caching):
        """UNet output (eps) for latents at timesteps t; ``cond``: {"crossattn", "vector"} from the conditioner."""
        return self.model(x_noisy, t, cond, **caching)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] (``AutoencoderKL.decode_checked``: an overflowing reduced-precision decode is
        redone in fp32)."""
        return self.first_stage_model.decode_checked(z / self.scale_factor)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior, generator: torch.Generator | None = None):
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            return self.scale_factor * encoder_posterior.sample(generator)
        if isinstance(encoder_posterior, torch.Tensor):
            return self.scale_factor * encoder_posterior
        raise TypeError(f"encoder_posterior of type {type(encoder_posterior).__name__} is not supported")


__all__ = ["DiffusionEngine", "SDXLConfig", "DenoiserConfig", "DiscreteDenoiser", "SDXLWrapper", "eps_scaling",
           "EpsScaling", "LegacyDDPMDiscretization", "legacy_ddpm_sigmas", "BUFFER_NAMES"]
