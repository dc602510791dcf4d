"""The technique ladder of the benchmark: speed features added one at a time, ours and the peer's, side by side.

In the style of the Hugging Face post "Accelerate generative AI: Stable Diffusion XL" (fp32 baseline, then
reduced precision, SDPA, torch.compile, fused projections, dynamic int8): each step keeps every earlier
technique and adds one, so the table reads as the cumulative latency and speed-up. Step k of ours is
configuration ``S<k>``, the peer (diffusers with the same technique, its own implementation) ``H<k>``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    name: str
    ours_on: tuple[str, ...] = ()  # txt2img flags this step adds
    ours_off: tuple[str, ...] = ()  # txt2img flags this step removes
    peer_on: tuple[str, ...] = ()
    peer_off: tuple[str, ...] = ()


def steps(low_dtype: str = "bf16") -> list[Step]:
    """The ladder; ``low_dtype`` is the reduced precision of step 1 (bf16, or fp16 on older GPUs)."""
    return [
        Step("fp32, original attention (softmax(QK^T)V), separate Q/K/V matmuls",
             ("--dtype", "fp32", "--attention", "math", "--unfused_projections"), (),
             ("--dtype", "fp32", "--attention", "math"), ()),
        Step(f"+ {low_dtype} weights and activations", ("--dtype", low_dtype), ("--dtype", "fp32"),
             ("--dtype", low_dtype), ("--dtype", "fp32")),
        Step("+ SDPA (F.scaled_dot_product_attention)", (), ("--attention", "math"), (), ("--attention", "math")),
        Step("+ fused projections (QKV one matmul, cross-attention KV one matmul)", (), ("--unfused_projections",),
             ("--fuse_projections",), ()),
        Step("+ channels_last (UNet and VAE)", ("--channels_last",), (), ("--channels_last",), ()),
        Step("+ torch.compile of the UNet", ("--compile",), (), ("--compile",), ()),
        Step("+ max-autotune (diffusion-fast inductor settings)", ("--compile_mode", "max-autotune"), (),
             ("--compile_mode", "max-autotune"), ()),
        Step("+ dynamic int8 quantization of the UNet's linears (torchao)", ("--int8",), (), ("--int8",), ()),
    ]


def _remove(flags: list[str], drop: tuple[str, ...]) -> list[str]:
    """``flags`` less the option ``drop`` names (with its value when ``drop`` has one)."""
    if not drop:
        return flags
    out, i = [], 0
    while i < len(flags):
        if flags[i] == drop[0] and tuple(flags[i:i + len(drop)]) == drop:
            i += len(drop)
        else:
            out.append(flags[i])
            i += 1
    return out


def cumulative(ladder: list[Step]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(our flags, the peer's flags) at each step, every earlier technique kept."""
    ours: list[str] = []
    peer: list[str] = []
    out = []
    for s in ladder:
        ours = _remove(ours, s.ours_off) + list(s.ours_on)
        peer = _remove(peer, s.peer_off) + list(s.peer_on)
        out.append((tuple(ours), tuple(peer)))
    return out


def _rows(values: dict[str, float], ladder: list[Step], title: str, unit: str) -> list[str]:
    """A ladder table: each step's value and speed-up over step 0, ours (S<k>) and the peer's (H<k>), and
    peer/ours; none when nothing was measured."""
    if not values:
        return []
    fmt = lambda v: "–" if v is None else (f"{v:.0f}" if v >= 1e4 else f"{v:.4g}")
    x = lambda a, b: "–" if a is None or b is None else f"{b / a:.2f}x"
    lines = [title, "",
             f"| step | technique | ours {unit} | ours speed-up | diffusers {unit} | diffusers speed-up | diffusers/ours |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    s0, h0 = values.get("S0"), values.get("H0")
    for k, step in enumerate(ladder):
        s, h = values.get(f"S{k}"), values.get(f"H{k}")
        lines.append(f"| {k} | {step.name} | {fmt(s)} | {x(s, s0)} | {fmt(h)} | {x(h, h0)} | {x(s, h)} |")
    return lines


def table(summary: list[dict], ladder: list[Step], batch: int) -> list[str]:
    """Markdown rows: each step's mean seconds and speed-up over step 0, ours and the peer's, and ours/peer."""
    means = {r["config"]: r["mean_s"] for r in summary if r["batch"] == batch and r.get("mean_s")}
    return _rows(means, ladder, f"### Technique ladder, batch size {batch}: each row adds one technique to the row "
                                "above", "s")


def unet_table(unet_rows: list[dict], ladder: list[Step], unet_batch: int) -> list[str]:
    """Markdown rows of the UNet microbenchmark along the ladder: ms per guided step, ours and the peer's."""
    ms = {u["config"]: u["ms_mean"] for u in unet_rows if u.get("unet_batch") == unet_batch and u.get("ms_mean")}
    return _rows(ms, ladder, f"### Technique ladder, the UNet alone (UNet batch {unet_batch}): ms per guided step",
                 "ms")
