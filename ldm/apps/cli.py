"""Command-line pieces shared by txt2img, img2img and inpaint (``ldm.apps.*``, scripts/*.py).

The scripts parse their own task flags; this module owns the flags every script shares (model,
device and dtype, attention kernels, speed features), turns them into a loaded, optimised model
and reports errors as one line. Nothing here runs at import.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from ldm.apps.sampler_choice import SAMPLERS, make_sampler, sampler_flag  # noqa: F401 (the scripts' import path)
from ldm.fileio import DiskSpaceError

DEMO_PRESET = "tiny"  # --demo: ldm.model.presets' tiny SD2-shaped model
DEMO_MODELS = {"sd": None, "sdxl": "sdxl-tiny", "sdxl-refiner": "sdxl-refiner-tiny"}  # --demo NAME (sd: the script's)
WEIGHTS_HELP = "see README.md, section 'Weights' (checkpoints/README.md lists the files and where to get them)"
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator().manual_seed accepts
INTERRUPTED = 130  # the exit status of a process ended by Ctrl-C (128 + SIGINT)


class UserError(Exception):
    """A problem with the command line or the inputs, reported as one line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while images were being written; the message says which were."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--config/--ckpt/--device/--dtype/--precision/--seed/--demo/--debug and the attention kernels."""
    from ldm.model.attention import BACKENDS
    from ldm.model.config import DTYPES
    from ldm.speed.runtime import PRECISIONS
    p.add_argument("--config", type=str, default=None,
                   help="model yaml (default: chosen from the checkpoint's keys, and printed)")
    p.add_argument("--ckpt", type=str, help="path to the checkpoint (.ckpt or .safetensors, either layout)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--seed_per_item", action="store_true",
                   help="image g's start noise from seed + g, as under torchrun: the same images whatever the "
                        "number of ranks (default without torchrun: one generator for the whole run)")
    p.add_argument("--dist_timeout", type=float, default=1800.0,  # distributed.DEFAULT_TIMEOUT
                   help="under torchrun: seconds a rank waits for the others (rank 0 compiles first) before failing")
    p.add_argument("--precision", type=str, choices=list(PRECISIONS), default=None,
                   help="autocast (default on CUDA, as the original) or full (default on CPU)")
    p.add_argument("--device", type=str, default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="weights and activations")
    p.add_argument("--bf16", action="store_true", help="alias of --dtype bf16")
    p.add_argument("--attention", choices=list(BACKENDS), default="sdpa")
    p.add_argument("--disable_math", action="store_true", help="SDPA: disable the math kernel")
    p.add_argument("--disable_mem_efficient", action="store_true", help="SDPA: disable memory-efficient kernels")
    p.add_argument("--disable_flash", action="store_true", help="SDPA: disable flash attention")
    p.add_argument("--demo", nargs="?", const="sd", default=None, choices=list(DEMO_MODELS),
                   help="tiny random model, no weights needed: the image is noise (--demo sdxl: a tiny SDXL)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (and the first non-finite UNet call)")
    p.add_argument("--keep_nonfinite", action="store_true",
                   help="save images even when a stage went NaN/inf (default: refuse them, naming the stage)")


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """The speed and memory flags of the PyTorch 2 blog, the acceleration write-ups and this project, plus timing."""
    from ldm.speed.runtime import COMPILE_MODES
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (fullgraph)")
    p.add_argument("--compile_mode", choices=list(COMPILE_MODES), default="default",
                   help="max-autotune adds diffusion-fast's inductor settings; reduce-overhead = CUDA graphs")
    p.add_argument("--compile_vae", action="store_true", help="torch.compile the VAE decoder too")
    p.add_argument("--channels_last", action="store_true", help="UNet and VAE convolutions in channels_last")
    p.add_argument("--unfused_projections", action="store_true",
                   help="separate Q, K, V matmuls as the original (default: one QKV / one KV matmul)")
    p.add_argument("--int8", action="store_true",
                   help="dynamic int8 quantization of the UNet's large linear layers (needs torchao; use with --compile)")
    p.add_argument("--vae_slicing", action="store_true", help="decode one image of the batch at a time")
    p.add_argument("--vae_tiling", action="store_true",
                   help="decode/encode in overlapping tiles, blended: large images in bounded memory")
    p.add_argument("--offload", action="store_true",
                   help="keep text encoder, UNet and VAE (the SDXL refiner's too) on the CPU, each on the device "
                        "only while it runs")
    p.add_argument("--no_tf32", action="store_true", help="fp32 on CUDA: keep full fp32 matmuls (default: TF32)")
    p.add_argument("--skip_first", action="store_true", help="one untimed warm-up iteration first")
    p.add_argument("--time_file", type=str, default=None, help="write the timed runtime (seconds) here")


def number_problem(opt: argparse.Namespace) -> str | None:
    """What is wrong with the flags' numbers (a float flag not finite, a seed torch's generator cannot take), or
    None; the scripts and the benchmark both ask."""
    for name, value in sorted(vars(opt).items()):
        if isinstance(value, float) and not math.isfinite(value):
            return f"--{name} {value} must be a finite number"
    if not SEED_RANGE[0] <= opt.seed <= SEED_RANGE[1]:
        return f"--seed {opt.seed} is out of range: torch's generator takes -2**63 to 2**64 - 1"
    return None


def check_numbers(opt: argparse.Namespace) -> None:
    """Every float flag finite, the seed one torch's generator takes, --n_rows not negative."""
    if problem := number_problem(opt):
        raise UserError(problem)
    if opt.n_rows < 0:
        raise UserError(f"--n_rows {opt.n_rows} must be 0 (one row per batch) or more")
    if not getattr(opt, "dist_timeout", 1.0) > 0:
        raise UserError(f"--dist_timeout {opt.dist_timeout} must be more than 0 seconds")


def check_model_args(opt: argparse.Namespace) -> None:
    """Reject bad model/speed flag combinations and unwritable outputs before anything is loaded."""
    from ldm.apps.images import check_outputs
    check_outputs(opt.outdir, getattr(opt, "time_file", None))
    if opt.bf16 and opt.dtype not in (None, "bf16"):
        raise UserError(f"--bf16 conflicts with --dtype {opt.dtype}")
    if not opt.demo and not opt.ckpt:
        raise UserError(f"--ckpt is required (or try --demo, which needs no weights); {WEIGHTS_HELP}")
    if getattr(opt, "compile_mode", "default") != "default" and not opt.compile and not opt.compile_vae:
        raise UserError(f"--compile_mode {opt.compile_mode} needs --compile or --compile_vae")
    if getattr(opt, "compile_vae", False) and getattr(opt, "vae_tiling", False):
        raise UserError("--compile_vae with --vae_tiling would compile the decoder again for every tile shape; "
                        "pick one")
    if getattr(opt, "int8", False) and opt.attention in ("mha", "xformers"):
        raise UserError(f"--int8 does not run with --attention {opt.attention}; use sdpa or math")


def add_sampler_arg(p: argparse.ArgumentParser) -> None:
    """--sampler NAME beside the original --plms/--dpm."""
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help="the sampler (default: DDIM for SD 1/2, Euler for SDXL; --plms/--dpm are the same as "
                        "--sampler plms/dpm; euler, euler_a, dpmpp_2m step sgm's discrete sigmas)")


def check_sampler_args(opt: argparse.Namespace, counts: tuple[str, ...]) -> None:
    """One sampler flag at most, eta only with DDIM, and each flag named in ``counts`` at least 1."""
    chosen = [f"--{n}" for n in ("plms", "dpm") if getattr(opt, n)] + (
        [f"--sampler {opt.sampler}"] if getattr(opt, "sampler", None) else [])
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} are conflicting sampler flags; pick one")
    if (chosen and chosen != ["--sampler ddim"]) and opt.ddim_eta != 0:
        raise UserError(f"--ddim_eta is a DDIM option; it must be 0 with "
                        f"{'--plms/--dpm' if chosen[0] in ('--plms', '--dpm') else chosen[0]}")
    for name in counts:
        if getattr(opt, name) < 1:
            raise UserError(f"--{name} must be at least 1")


@dataclass(frozen=True)
class Runtime:
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    precision: str
    backends: list


def read_prompts(opt: argparse.Namespace) -> list[list[str]]:
    """Batches of prompts, as the original: the prompt n_samples times, or the file's lines (each
    ``--repeat`` times where the script has that flag) chunked into batches of n_samples."""
    from itertools import islice
    if not opt.from_file:
        return [opt.n_samples * [opt.prompt]]
    if not os.path.isfile(opt.from_file):
        raise UserError(f"prompt file not found: {opt.from_file}")
    try:
        with open(opt.from_file, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {opt.from_file} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not lines:
        raise UserError(f"prompt file {opt.from_file} has no prompts")
    lines = [p for p in lines for _ in range(getattr(opt, "repeat", 1))]
    it = iter(lines)
    return [list(b) for b in iter(lambda: tuple(islice(it, opt.n_samples)), ())]


def setup(opt: argparse.Namespace) -> Runtime:
    """Device, dtype, precision scope and SDPA kernels from the flags, checked to work together."""
    import torch
    from ldm.model.config import DTYPES
    from ldm.speed import runtime
    device = runtime.pick_device(opt.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    dtype = DTYPES[opt.dtype or ("bf16" if opt.bf16 else "fp32")]
    precision = opt.precision or ("autocast" if device.type == "cuda" else "full")
    backends = runtime.sdpa_backends(opt.disable_math, opt.disable_mem_efficient, opt.disable_flash)
    runtime.check_sdpa(backends, device, dtype)
    return Runtime(device, dtype, precision, backends)


def resolve_config(opt: argparse.Namespace) -> str:
    """--config, or the shipped config that fits the checkpoint's keys (said on stderr)."""
    from ldm.weights.detect import config_for
    path, message = config_for(opt.ckpt, opt.config)
    if message:
        print(message, file=sys.stderr)
    return path


def build_model(opt: argparse.Namespace, rt: Runtime, demo_preset: str = DEMO_PRESET):
    """(model, model name) from --ckpt/--config, or a tiny random model for --demo."""
    import torch
    from tqdm import tqdm
    from ldm.model.attention import set_attention_backend
    from ldm.weights.loading import load_model
    if opt.demo:
        from ldm.model.presets import from_name
        from ldm.weights.loading import model_class
        torch.manual_seed(opt.seed)
        device = torch.device("cpu") if getattr(opt, "offload", False) else rt.device
        preset = DEMO_MODELS.get(opt.demo) or demo_preset  # True or "sd": the script's own tiny model
        cfg = from_name(preset)
        model = model_class(cfg)(cfg).to(device=device, dtype=rt.dtype)
        set_attention_backend(model, opt.attention)
        return model, "demo-tiny-random" if preset == DEMO_PRESET else f"demo-{preset}-random"
    if not os.path.isfile(opt.ckpt):
        raise UserError(f"checkpoint not found: {opt.ckpt}; {WEIGHTS_HELP}")
    config = resolve_config(opt)
    device = torch.device("cpu") if getattr(opt, "offload", False) else rt.device  # offload moves parts later
    with tqdm(total=3, desc="Loading model", unit="stage") as bar:
        model, report = load_model(config, opt.ckpt, device=device, dtype=rt.dtype, attention=opt.attention,
                                   progress=lambda stage: bar.update(1))
    note = " (original layout, converted in memory)" if report.converted else ""
    print(f"Loaded {opt.ckpt}{note} in {report.seconds:.1f}s", file=sys.stderr)
    return model, os.path.splitext(os.path.basename(opt.ckpt))[0]


def native_size(model, demo: bool = False) -> int:
    """The image side the model was trained at: 768 for SD 2's v-prediction release (768-v), else 512 (64 for --demo).

    The yamls do not say it (``image_size`` is 64 latents in both SD 2 configs); eps vs v is the only difference.
    SDXL (base and refiner): 1024.
    """
    if demo:
        return 64
    if hasattr(model, "conditioner"):
        return 1024
    return 768 if model.parameterization == "v" else 512


def check_latent_size(model, height: int, width: int, f: int) -> None:
    """The UNet halves the latent len(channel_mult)-1 times and must double it back exactly: sides must be
    multiples of f * 2**(levels-1) (64 for SD), or the skip connections do not line up."""
    multiple = f * 2 ** (len(model.cfg.unet.channel_mult) - 1)
    for name, v in (("H", height), ("W", width)):
        if v % multiple:
            raise UserError(f"--{name} {v} must be a multiple of {multiple} for this model (its UNet halves "
                            f"the latent {len(model.cfg.unet.channel_mult) - 1} times)")


def check_latent_flags(model, f: int, C: int) -> None:
    """--f and --C must be the loaded model's: its VAE downsamples by 2**(len(ch_mult)-1) into embed_dim channels."""
    vae = model.cfg.vae
    factor = 2 ** (len(vae.ch_mult) - 1)
    if f != factor:
        raise UserError(f"--f {f} does not match the model: its VAE downsamples by {factor} (use --f {factor})")
    if C != vae.embed_dim:
        raise UserError(f"--C {C} does not match the model: its latents have {vae.embed_dim} channels "
                        f"(use --C {vae.embed_dim})")


def optimize(opt: argparse.Namespace, model, rt: Runtime, offload_with=None) -> list[str]:
    """Apply the speed and memory flags to a loaded model, in place, in the one order that composes:
    layout and precision changes first, then offload, then compilation. Returns what was done.
    ``offload_with``: a model optimized before on the same device (SDXL's base, for its refiner): with --offload
    the components of both take turns on the device."""
    import torch
    from ldm.speed import runtime
    from ldm.speed.optimize import INT8_HELP, set_fused_projections, to_channels_last
    done = []
    set_fused_projections(model, not opt.unfused_projections)
    done.append("separate Q/K/V matmuls" if opt.unfused_projections else "fused QKV/KV projections")
    if opt.channels_last:
        to_channels_last(model.model)
        to_channels_last(model.first_stage_model)
        done.append("channels_last")
    if opt.int8:
        from ldm.speed.optimize import quantize_int8
        if importlib.util.find_spec("torchao") is None:
            raise UserError(INT8_HELP)
        names = quantize_int8(model.model.diffusion_model)
        done.append(f"int8 dynamic quantization of {len(names)} UNet layers")
    if opt.vae_slicing or opt.vae_tiling:
        model.first_stage_model.set_memory_savers(slicing=opt.vae_slicing, tiling=opt.vae_tiling)
        done.append("VAE " + " and ".join(n for n, on in (("slicing", opt.vae_slicing), ("tiling", opt.vae_tiling))
                                          if on))
    if rt.dtype == torch.float32 and not opt.no_tf32 and runtime.enable_tf32(rt.device):
        done.append("TF32 matmuls (--no_tf32 for full fp32)")
    if opt.offload:
        from ldm.speed.offload import enable_model_offload
        if (opt.compile or opt.compile_vae) and runtime.uses_cudagraphs(opt.compile_mode, rt.device):
            raise UserError(f"--offload moves weights between calls, which CUDA graphs (--compile_mode "
                            f"{opt.compile_mode}) cannot follow; use --compile_mode default or drop --offload")
        enable_model_offload(model, rt.device, share_with=getattr(offload_with, "_ldm_offload", None))
        done.append(f"model offload to {rt.device.type} per component")
    if opt.compile:
        runtime.compile_unet(model, opt.compile_mode, rt.device)
        done.append(f"compiled UNet ({opt.compile_mode})")
    if opt.compile_vae:
        runtime.compile_vae(model, opt.compile_mode, rt.device)
        done.append(f"compiled VAE decoder ({opt.compile_mode})")
    return done


def guidance_conditioning(model, prompts: list[str], negative_prompt: str, scale: float, sizes=None):
    """(c, uc): the conditionings of classifier-free guidance; uc is None at scale 1 (no unconditional pass).
    SDXL: ``sizes`` is (opt, height, width) for its size conditioning (``ldm.apps.sdxl.size_batch``)."""
    if hasattr(model, "conditioner"):
        from ldm.apps.sdxl import sdxl_conditioning, size_batch
        return sdxl_conditioning(model, size_batch(*sizes[:1], prompts, *sizes[1:]), negative_prompt, scale)
    uc = None if scale == 1.0 else model.get_learned_conditioning(len(prompts) * [negative_prompt])
    return model.get_learned_conditioning(prompts), uc


def print_summary(opt: argparse.Namespace, summary: dict) -> None:
    """The closing line: images, timed seconds and rate, where the files are."""
    s = summary["seconds"]
    ranks = (f" on {summary['ranks']} ranks, {summary['wall_seconds']:.2f}s wall" if "ranks" in summary else "")
    print(f"Sampled {summary['images']} images in {s:.2f}s ({summary['images'] / s if s > 0 else 0.0:.3f} images/s, "
          f"timed{' after a warm-up iteration' if opt.skip_first else ''}{ranks}). Samples in {opt.outdir}/samples, "
          f"grid {summary['grid']}")
    first = [f for f in summary.get("first_call_seconds") or [] if f is not None]
    if len(first) > 1 and (opt.compile or opt.compile_vae):
        print(f"first call (compilation): rank 0 {first[0]:.2f}s, then from its FX graph cache ranks 1..: "
              + ", ".join(f"{f:.2f}s" for f in first[1:]))


def describe(e: BaseException) -> str:
    """A one-line message; out-of-memory says which flags reduce memory."""
    import torch
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return ("out of memory: reduce --n_samples or the image size, use --dtype fp16/bf16, and keep the fused "
                "SDPA kernels (drop --disable_mem_efficient/--disable_flash, --attention math)")
    from ldm.apps.distributed import RankFailed
    if isinstance(e, (UserError, ValueError, FileNotFoundError, DiskSpaceError, RankFailed)):
        return text
    return f"{type(e).__name__}: {text} (run with --debug for the traceback)"


def run_script(opt: argparse.Namespace, check: Callable[[argparse.Namespace], None],
               run: Callable[[argparse.Namespace], dict], demo_model: str = "a tiny model") -> int:
    """A script's main: check the flags, say what --demo makes, run, print the summary; errors are one line.
    Under torchrun every rank does this (``ldm.apps.distributed``); rank 0 alone speaks, once for the job."""
    def body() -> int:
        from ldm.apps import distributed
        with distributed.job(opt.device, getattr(opt, "dist_timeout", distributed.DEFAULT_TIMEOUT), describe) as job:
            if job.launched:
                opt.device = job.device
            job.together(check, opt)
            if opt.demo and job.main:
                print(f"--demo: {demo_model} with RANDOM weights; the image will be noise. "
                      "It checks the pipeline, not the picture.", file=sys.stderr)
            summary = job.together(run, opt)
            if job.main:
                print_summary(opt, summary)
        return 0
    return guarded(opt, body)


def guarded(opt: argparse.Namespace, fn: Callable[[], int]) -> int:
    """Run ``fn`` with gradients off; errors become one line on stderr and exit status 1, Ctrl-C one line saying
    which images were written and exit status 130 (--debug re-raises both)."""
    try:
        import torch
        torch.set_grad_enabled(False)
        return fn()
    except KeyboardInterrupt as e:
        if opt.debug:
            raise
        print(f"interrupted: {e if isinstance(e, Interrupted) else 'no image was written'}", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        if opt.debug:
            raise
        from ldm.apps.distributed import RankFailed
        if not isinstance(e, RankFailed) or e.report:  # a failed job's line is printed by one rank only
            print(f"error: {describe(e)}", file=sys.stderr)
        return 1
