"""Inputs the scripts must read right or refuse in one line: every Pillow image mode at its full range (16-bit
PNGs were clipped at 255 of 65535), numeric flags and output paths checked before any model work, --f/--C against
the loaded model, broken model yamls named by file and key, Ctrl-C as one line and exit status 130, and the
benchmark's own flags as argparse usage errors."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY
from helpers import script_main
from ldm.apps import cli, pipelines

TINY_INPAINT = os.path.join(ROOT, "configs", "tiny", "v2-tiny-inpainting.yaml")
SIDE = 64  # a multiple of 64: no resizing, so every mode must give the 8-bit image's tensor exactly

# ----- images: every Pillow mode at its full range -----
RNG = np.random.default_rng(0)
GRAY8 = RNG.permutation(np.arange(SIDE * SIDE) % 256).astype(np.uint8).reshape(SIDE, SIDE)  # every level
RGB8 = RNG.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
ALPHA8 = RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
CMYK8 = RNG.integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8)
G16 = GRAY8.astype(np.uint16) * 257  # 65535 / 255 = 257: each 8-bit level's exact 16-bit value


def _muldiv255(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    t = a.astype(np.int64) * b + 128
    return ((t >> 8) + t) >> 8


def cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """Pillow's documented CMYK -> RGB: (255 - k) * (1 - c/255), rounded as its integer MULDIV255."""
    nk = 255 - cmyk[..., 3:].astype(np.int64)
    return (nk - _muldiv255(cmyk[..., :3], nk)).astype(np.uint8)


def gray3(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=-1)


def u16(values: np.ndarray, mode: str) -> Image.Image:
    """A 16-bit Pillow image of ``mode`` (I;16 / I;16L / I;16N little-endian, I;16B big-endian)."""
    return Image.frombytes(mode, (SIDE, SIDE), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())


def palette_image(transparency: bool) -> Image.Image:
    img = Image.fromarray(GRAY8, "P")
    img.putpalette(PALETTE.flatten().tolist())
    if transparency:
        img.info["transparency"] = 0
    return img


# mode id -> (image in that mode, the 8-bit RGB it stands for, file format keeping the mode (None: memory only),
#             words of the stderr note, exact)
def image_cases():
    bits = GRAY8 >= 128
    return {
        "1": (Image.fromarray(bits), gray3(np.where(bits, 255, 0).astype(np.uint8)), "PNG", "1-bit", True),
        "L": (Image.fromarray(GRAY8, "L"), gray3(GRAY8), "PNG", "8-bit grayscale converted to RGB", True),
        "P": (palette_image(False), PALETTE[GRAY8], "PNG", "palette converted to RGB", True),
        "P-transparency": (palette_image(True), PALETTE[GRAY8], "PNG", "palette with transparency", True),
        "LA": (Image.fromarray(np.stack([GRAY8, ALPHA8], -1), "LA"), gray3(GRAY8), "PNG", "alpha ignored", True),
        "RGBA": (Image.fromarray(np.concatenate([RGB8, ALPHA8[..., None]], -1), "RGBA"), RGB8, "PNG",
                 "RGBA converted to RGB (alpha ignored)", True),
        "CMYK": (Image.fromarray(CMYK8, "CMYK"), cmyk_to_rgb(CMYK8), "TIFF", "CMYK", True),
        "I;16": (u16(G16, "I;16"), gray3(GRAY8), "PNG", "16-bit grayscale (I;16) scaled to 0..1", True),
        "I;16B": (u16(G16, "I;16B"), gray3(GRAY8), "TIFF", "16-bit grayscale (I;16B)", True),
        "I;16L": (u16(G16, "I;16L"), gray3(GRAY8), None, "16-bit grayscale (I;16L)", True),
        "I;16N": (u16(G16, "I;16N"), gray3(GRAY8), None, "16-bit grayscale (I;16N)", True),
        "I-16-bit-values": (Image.fromarray(GRAY8.astype(np.int32) * 257, "I"), gray3(GRAY8), "TIFF",
                            "taken as 16-bit", True),
        "I-32-bit-values": (Image.fromarray(np.round(GRAY8 * ((2**31 - 1) / 255)).astype(np.int32), "I"),
                            gray3(GRAY8), "TIFF", "taken as 32-bit", False),
        "F": (Image.fromarray(GRAY8.astype(np.float32) / 255, "F"), gray3(GRAY8), "TIFF",
              "32-bit float grayscale taken as 0..1", True),
        "RGB": (Image.fromarray(RGB8, "RGB"), RGB8, "PNG", None, True),
    }


CASES = image_cases()


def expected_tensor(rgb8: np.ndarray) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] of an 8-bit RGB array: 2 * v / 255 - 1."""
    x = torch.from_numpy(rgb8.astype(np.float32) / 255.0)
    return (2.0 * x - 1.0).permute(2, 0, 1)[None]


def save(img: Image.Image, fmt: str, path) -> str:
    img.save(path, format=fmt)
    with Image.open(path) as back:
        assert back.mode == ("I;16" if img.mode == "I;16B" and fmt == "PNG" else img.mode)  # the premise holds
    return str(path)


@pytest.mark.parametrize("case", list(CASES))
def test_init_image_every_mode_is_the_8_bit_image_it_scales_to(case, tmp_path, capsys):
    img, rgb8, fmt, note, exact = CASES[case]
    ref_path = tmp_path / "ref.png"
    Image.fromarray(rgb8, "RGB").save(ref_path)
    want = pipelines.load_init_image(str(ref_path))
    assert torch.equal(want, expected_tensor(rgb8))
    capsys.readouterr()
    got = [pipelines.image_to_tensor(img)]  # the in-memory image
    if fmt:
        got.append(pipelines.load_init_image(save(img, fmt, tmp_path / f"init.{fmt.lower()}")))
        err = capsys.readouterr().err.strip().splitlines()
        if note is None:
            assert err == []
        else:
            assert len(err) == 1 and err[0].startswith("init image: ") and note in err[0], err
    for x in got:
        assert x.shape == (1, 3, SIDE, SIDE) and x.dtype == torch.float32
        if exact:
            assert torch.equal(x, want), (x - want).abs().max()
        else:
            assert (x - want).abs().max() <= 1e-6


def test_16_bit_png_is_not_clipped_at_255(tmp_path):
    """The issue's example: a 16-bit PNG with v16 = 257 * v8 is the 8-bit image, where Pillow's convert("RGB")
    saturates everything above 255 (of 65535) to white."""
    path = save(u16(G16, "I;16"), "PNG", tmp_path / "deep.png")
    with Image.open(path) as img:
        clipped = np.asarray(img.convert("L"))
    assert (clipped[GRAY8 > 0] == 255).all()  # what a plain convert does to this file
    assert torch.equal(pipelines.load_init_image(path), expected_tensor(gray3(GRAY8)))


def test_16_bit_image_is_resized_in_float(tmp_path):
    """A side that is not a multiple of 64 is shrunk at full precision (LANCZOS in float, no 8-bit rounding): on a
    smooth image, within the 8-bit path's rounding of it."""
    y, x = np.mgrid[0:70, 0:135]
    g = np.round(127.5 + 120 * np.sin(x / 9.0) * np.cos(y / 7.0)).astype(np.uint8)
    Image.fromarray(g, "L").save(tmp_path / "a8.png")
    Image.frombytes("I;16", (135, 70), (g.astype("<u2") * 257).tobytes()).save(tmp_path / "a16.png")
    x8 = pipelines.load_init_image(str(tmp_path / "a8.png"))
    x16 = pipelines.load_init_image(str(tmp_path / "a16.png"))
    assert x16.shape == x8.shape == (1, 3, 64, 128)
    assert x16.min() >= -1 and x16.max() <= 1
    ref = Image.fromarray(g.astype(np.float32) / 255, "F").resize((128, 64), resample=Image.LANCZOS)
    ref = 2 * torch.from_numpy(np.clip(np.asarray(ref), 0, 1)) - 1  # the float resize of v / 255, clipped
    assert torch.allclose(x16[0], ref.expand(3, -1, -1), rtol=0, atol=1e-6)
    assert (x16 - x8).abs().max() <= 3 / 255  # the 8-bit path: rounded per pass, in fixed point; 1.5 levels
    # overshoot of a float resize is clipped to [0, 1] as the 8-bit path clips
    edge = np.zeros((70, 135), dtype=np.uint16)
    edge[:, 60:] = 65535
    Image.frombytes("I;16", (135, 70), edge.astype("<u2").tobytes()).save(tmp_path / "edge.png")
    xe = pipelines.load_init_image(str(tmp_path / "edge.png"))
    assert xe.min() == -1 and xe.max() == 1


@pytest.mark.parametrize("values,message", [
    (np.full((SIDE, SIDE), -5, dtype=np.int32), "32-bit integer pixels go down to -5"),
    (np.full((SIDE, SIDE), 2.0, dtype=np.float32), "32-bit float pixels range over 2..2"),
    (np.full((SIDE, SIDE), np.nan, dtype=np.float32), "NaN or infinity"),
])
def test_deep_pixels_outside_their_range_are_refused(tmp_path, values, message):
    path = tmp_path / "bad.tiff"
    Image.fromarray(values).save(path)
    with pytest.raises(ValueError, match=message) as e:
        pipelines.load_init_image(str(path))
    assert str(e.value).startswith(f"init image {path}: ")


# masks: a 1.6%-grey keep region (4 of 255), the threshold's neighbours (127 keep, 128 repaint) and white
MASK8 = np.full((SIDE, SIDE), 4, dtype=np.uint8)
MASK8[:, 40:] = 255
MASK8[:8, :8], MASK8[:8, 8:16] = 127, 128
M16 = MASK8.astype(np.uint16) * 257


def mask_cases():
    bits = MASK8 >= 128
    pal = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1)  # gray palette: index v is (v, v, v)
    p = Image.fromarray(MASK8, "P")
    p.putpalette(pal.flatten().tolist())
    pt = p.copy()
    pt.info["transparency"] = 255
    k = np.zeros((SIDE, SIDE, 4), dtype=np.uint8)
    k[..., 3] = 255 - MASK8  # c = m = y = 0: RGB (v, v, v)
    return {
        "1": (Image.fromarray(bits), np.where(bits, 255, 0).astype(np.uint8), "PNG"),
        "L": (Image.fromarray(MASK8, "L"), MASK8, "PNG"),
        "P": (p, MASK8, "PNG"),
        "P-transparency": (pt, MASK8, "PNG"),
        "LA": (Image.fromarray(np.stack([MASK8, ALPHA8], -1), "LA"), MASK8, "PNG"),
        "RGBA": (Image.fromarray(np.concatenate([gray3(MASK8), ALPHA8[..., None]], -1), "RGBA"), MASK8, "PNG"),
        "CMYK": (Image.fromarray(k, "CMYK"), MASK8, "TIFF"),
        "I;16": (u16(M16, "I;16"), MASK8, "PNG"),
        "I;16B": (u16(M16, "I;16B"), MASK8, "TIFF"),
        "I;16L": (u16(M16, "I;16L"), MASK8, None),
        "I;16N": (u16(M16, "I;16N"), MASK8, None),
        "I-16-bit-values": (Image.fromarray(MASK8.astype(np.int32) * 257, "I"), MASK8, "TIFF"),
        "I-32-bit-values": (Image.fromarray(np.round(MASK8 * ((2**31 - 1) / 255)).astype(np.int32), "I"), MASK8,
                            "TIFF"),
        "F": (Image.fromarray(MASK8.astype(np.float32) / 255, "F"), MASK8, "TIFF"),
        "RGB": (Image.fromarray(gray3(MASK8), "RGB"), MASK8, "PNG"),
    }


MASKS = mask_cases()


@pytest.mark.parametrize("case", list(MASKS))
def test_mask_every_mode_keeps_the_grey_region(case, tmp_path, capsys):
    mask, gray8, fmt = MASKS[case]
    want = torch.from_numpy(gray8.astype(np.float64) / 255 >= 0.5).float()[None, None]
    assert want[0, 0, :, :40].sum() == 8 * 8 and want[0, 0, 8:, :40].sum() == 0  # only the 128 square repaints
    got = [pipelines.mask_to_tensor(mask)]
    if fmt:
        image = tmp_path / "image.png"
        Image.fromarray(RGB8).save(image)
        inputs = pipelines.load_inpaint_inputs(str(image), save(mask, fmt, tmp_path / f"mask.{fmt.lower()}"))
        got.append(inputs.mask)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == (0 if case == "L" else 1), err
        assert all(line.startswith("mask: ") for line in err)
        keep = inputs.masked_image[0, :, 8:, :40]  # the grey region is kept: the image's pixels, not zeros
        assert torch.equal(keep, expected_tensor(RGB8)[0, :, 8:, :40])
    for m in got:
        assert torch.equal(m, want)


def test_cli_reads_16_bit_inputs_and_says_so(tmp_path, capsys):
    """img2img and inpaint end to end (--demo) on 16-bit files: each input's conversion in one stderr line."""
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    u16(G16, "I;16").save(image)
    u16(M16, "I;16").save(mask)
    common = ["--demo", "--device", "cpu", "--n_samples", "1", "--scale", "1"]
    assert script_main("img2img")(["--init-img", str(image), "--ddim_steps", "2", "--strength", "0.5",
                                   "--outdir", str(tmp_path / "a"), *common]) == 0
    err = capsys.readouterr().err
    assert "init image: 16-bit grayscale (I;16) scaled to 0..1 (gray copied to R, G and B)" in err.splitlines()
    assert script_main("inpaint")(["--image", str(image), "--mask", str(mask), "--steps", "1",
                                   "--outdir", str(tmp_path / "b"), *common]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert "mask: 16-bit grayscale (I;16) scaled to 0..1" in lines
    assert "image: 16-bit grayscale (I;16) scaled to 0..1 (gray copied to R, G and B)" in lines
    assert os.listdir(tmp_path / "a" / "samples") == os.listdir(tmp_path / "b" / "samples") == ["00000.png"]
    torch.set_grad_enabled(True)


# ----- numeric flags and output paths: one line, before any model work -----
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    Image.fromarray(RGB8).save(d / "image.png")
    Image.fromarray(MASK8).save(d / "mask.png")
    return {"image": str(d / "image.png"), "mask": str(d / "mask.png")}


def script_argv(script: str, inputs: dict, out) -> list[str]:
    base = ["--demo", "--device", "cpu", "--n_samples", "1", "--outdir", str(out)]
    return base + {"txt2img": ["--steps", "1", "--n_iter", "1", "--H", "64", "--W", "64"],
                   "img2img": ["--init-img", inputs["image"], "--ddim_steps", "2", "--n_iter", "1"],
                   "inpaint": ["--image", inputs["image"], "--mask", inputs["mask"], "--steps", "1"]}[script]


def run_main(script: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    try:
        code = script_main(script)(argv)
    finally:
        torch.set_grad_enabled(True)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def tree(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


NUMBERS = [
    (["--scale", "nan"], "--scale nan must be a finite number"),
    (["--scale", "inf"], "--scale inf must be a finite number"),
    (["--scale=-inf"], "--scale -inf must be a finite number"),
    (["--ddim_eta", "nan"], "--ddim_eta nan must be a finite number"),
    (["--plms", "--ddim_eta", "nan"], "--ddim_eta nan must be a finite number"),
    (["--seed", str(2**64)], f"--seed {2**64} is out of range"),
    ([f"--seed={-2**63 - 1}"], f"--seed {-2**63 - 1} is out of range"),
    (["--n_rows", "-1"], "--n_rows -1 must be 0"),
]
SCRIPTS = ["txt2img", "img2img", "inpaint"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags,message", NUMBERS, ids=[m for _, m in NUMBERS])
def test_numeric_flags_are_checked_before_any_model_work(script, flags, message, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main(script, script_argv(script, inputs, out) + flags, capsys)
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err  # no --demo line: not built
    assert not out.exists()


@pytest.mark.parametrize("value,message", [("nan", "--strength nan must be a finite number"),
                                           ("inf", "--strength inf must be a finite number")])
def test_img2img_strength_must_be_finite(value, message, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main("img2img", script_argv("img2img", inputs, out) + ["--strength", value], capsys)
    assert code == 1 and len(err) == 1 and err[0] == f"error: {message}", err
    assert not out.exists()


def test_seed_range_is_torchs():
    lo, hi = cli.SEED_RANGE
    for seed in (lo, hi):
        torch.Generator().manual_seed(seed)
        cli.check_numbers(argparse.Namespace(seed=seed, n_rows=0))
    for seed in (lo - 1, hi + 1):
        with pytest.raises((RuntimeError, ValueError)):  # torch's own error names no flag
            torch.Generator().manual_seed(seed)
        with pytest.raises(cli.UserError, match="out of range"):
            cli.check_numbers(argparse.Namespace(seed=seed, n_rows=0))


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A read-only folder; as root (who may write anywhere) os.access is made to say what it says for others."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(folder)
                            and mode & os.W_OK else real(p, mode, **kw))
    yield folder
    folder.chmod(0o755)


PATHS = [
    ("--time_file", "{DIR}", "--time_file {DIR} is a folder; give the path of a file"),
    ("--time_file", "{FILE}/t.txt", "--time_file {FILE}/t.txt cannot be written: {FILE} is a file, not a folder"),
    ("--time_file", "{RO}/t.txt", "--time_file {RO}/t.txt cannot be written: the folder {RO} is read-only"),
    ("--outdir", "{FILE}", "--outdir {FILE} cannot be used: {FILE} exists and is not a folder"),
    ("--outdir", "{FILE}/sub", "--outdir {FILE}/sub cannot be written: {FILE} is a file, not a folder"),
    ("--outdir", "{RO}", "--outdir {RO} cannot be written: the folder {RO} is read-only"),
    ("--outdir", "{RO}/new/deeper", "--outdir {RO}/new/deeper cannot be written: the folder {RO} is read-only"),
    ("--outdir", "{SAMPLES}", "--outdir {SAMPLES} cannot be used: {SAMPLES}/samples exists and is not a folder"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag,value,message", PATHS, ids=[f"{f} {v}" for f, v, _ in PATHS])
def test_unwritable_outputs_are_refused_before_any_model_work(script, flag, value, message, inputs, tmp_path,
                                                             read_only, capsys):
    places = {"DIR": tmp_path / "dir", "FILE": tmp_path / "file", "RO": read_only, "SAMPLES": tmp_path / "s"}
    places["DIR"].mkdir()
    places["FILE"].write_text("keep me")
    places["SAMPLES"].mkdir()
    (places["SAMPLES"] / "samples").write_text("not a folder")
    sub = {k: str(v) for k, v in places.items()}
    before = tree(tmp_path)
    argv = script_argv(script, inputs, tmp_path / "out")
    if flag == "--outdir":
        argv[argv.index("--outdir") + 1] = value.format(**sub)
    else:
        argv += [flag, value.format(**sub)]
    code, err = run_main(script, argv, capsys)
    assert code == 1
    assert len(err) == 1 and err[0] == "error: " + message.format(**sub), err  # no --demo line: nothing built
    assert tree(tmp_path) == before and places["FILE"].read_text() == "keep me"  # nothing written anywhere


@pytest.mark.parametrize("script", SCRIPTS)
def test_outdir_flag_without_a_value(script, inputs, tmp_path, capsys):
    argv = script_argv(script, inputs, tmp_path / "out")
    argv.remove(str(tmp_path / "out"))  # "--outdir" alone: argparse gives None (nargs="?")
    code, err = run_main(script, argv, capsys)
    assert code == 1 and err == ["error: --outdir needs the path of a folder"], err


def test_time_file_folder_is_made_and_written_after_a_run(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main("txt2img", script_argv("txt2img", inputs, out) + ["--time_file", str(out / "t" / "t.txt")],
                         capsys)
    assert code == 0, err
    assert float((out / "t" / "t.txt").read_text()) > 0 and tree(out / "samples") == ["00000.png"]


def test_prompt_file_that_is_not_text(inputs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a cat\n\xff\xfe\x00binary\n")
    out = tmp_path / "out"
    code, err = run_main("txt2img", script_argv("txt2img", inputs, out) + ["--from-file", str(prompts)], capsys)
    assert code == 1 and err[-1] == f"error: prompt file {prompts} is not UTF-8 text (invalid start byte at byte 6)"
    assert sum(line.startswith("error") for line in err) == 1, err
    assert not out.exists()


# ----- --f and --C against the loaded model -----
@pytest.mark.parametrize("script", ["txt2img", "img2img"])
@pytest.mark.parametrize("flags,message", [
    (["--f", "16"], "--f 16 does not match the model: its VAE downsamples by 8 (use --f 8)"),
    (["--f", "4"], "--f 4 does not match the model: its VAE downsamples by 8 (use --f 8)"),
    (["--C", "3"], "--C 3 does not match the model: its latents have 4 channels (use --C 4)"),
])
def test_latent_flags_must_be_the_models(script, flags, message, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main(script, script_argv(script, inputs, out) + flags, capsys)
    assert code == 1
    errors = [line for line in err if line.startswith("error")]
    assert errors == [f"error: {message}"] and err[-1] == errors[0], err  # after the load, before sampling
    assert not any("Traceback" in line for line in err)
    assert not out.exists()


def test_txt2img_refuses_an_inpainting_model(tmp_path, capsys):
    from ldm.apps.random_checkpoint import make_random_checkpoint
    ckpt = str(tmp_path / "inpaint.safetensors")
    make_random_checkpoint(ckpt, TINY_INPAINT, seed=0, progress=False)
    out = tmp_path / "out"
    code, err = run_main("txt2img", ["--config", TINY_INPAINT, "--ckpt", ckpt, "--H", "64", "--W", "64", "--steps",
                                     "1", "--n_iter", "1", "--n_samples", "1", "--outdir", str(out), "--device",
                                     "cpu"], capsys)
    assert code == 1 and err[-1].startswith("error: txt2img needs a text-to-image model"), err
    assert not out.exists()


# ----- model yamls: one line naming the file and the key -----
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from ldm.apps.random_checkpoint import make_random_checkpoint
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
    make_random_checkpoint(path, TINY, seed=0, progress=False)
    return path


def _tiny_yaml_with(keys: tuple[str, ...], value) -> str:
    import yaml
    with open(TINY, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    node = data
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return yaml.safe_dump(data)


UNET = ("model", "params", "unet_config", "params")
VAE = ("model", "params", "first_stage_config", "params", "ddconfig")
BAD_YAMLS = [
    ("empty", "", "the file is empty"),
    ("comments only", "# nothing here\n", "the file is empty"),
    ("a list", "- model\n- params\n", "expected a mapping (model: target/params), got a list"),
    ("binary", bytes(range(256)) * 4, "not a readable yaml file"),
    ("nul bytes", b"\x00\x01\x02" * 10, "not a readable yaml file"),
    ("bad syntax", "model: [unclosed\n", "not a readable yaml file"),
    ("model not a mapping", "model: 3\n", "model: expected a mapping, got int 3"),
    ("no params", "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n", "model has no params"),
    ("target not a string", _tiny_yaml_with(("model", "target"), 5), "model.target: expected a string, got int 5"),
    ("int key as string", _tiny_yaml_with(UNET + ("model_channels",), "32"),
     "model.params.unet_config.params.model_channels: expected an integer, got str '32'"),
    ("list key as int", _tiny_yaml_with(UNET + ("channel_mult",), 2),
     "model.params.unet_config.params.channel_mult: expected a list of integers, got int 2"),
    ("bool key as string", _tiny_yaml_with(UNET + ("use_linear_in_transformer",), "yes"),
     "model.params.unet_config.params.use_linear_in_transformer: expected true or false, got str 'yes'"),
    ("vae list as string", _tiny_yaml_with(VAE + ("ch_mult",), "1,2,2,2"),
     "model.params.first_stage_config.params.ddconfig.ch_mult: expected a list of integers, got str '1,2,2,2'"),
    ("float key as string", _tiny_yaml_with(("model", "params", "linear_start"), "small"),
     "model.params.linear_start: expected a number, got str 'small'"),
    ("int key as float", _tiny_yaml_with(("model", "params", "cond_stage_config", "params", "layers"), 2.5),
     "model.params.cond_stage_config.params.layers: expected an integer, got float 2.5"),
    ("section not a mapping", _tiny_yaml_with(("model", "params", "unet_config"), [1, 2]),
     "model.params.unet_config: expected a mapping, got list [1, 2]"),
    ("unknown key", _tiny_yaml_with(UNET + ("bogus",), 1), "UNetModel: unknown config key(s) bogus"),
]


@pytest.mark.parametrize("content,message", [(c, m) for _, c, m in BAD_YAMLS], ids=[n for n, _, _ in BAD_YAMLS])
def test_bad_config_is_one_line_naming_file_and_key(content, message, tiny_ckpt, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    (config.write_bytes if isinstance(content, bytes) else config.write_text)(content)
    out = tmp_path / "out"
    code, err = run_main("txt2img", ["--config", str(config), "--ckpt", tiny_ckpt, "--H", "64", "--W", "64",
                                     "--steps", "1", "--n_iter", "1", "--n_samples", "1", "--outdir", str(out),
                                     "--device", "cpu"], capsys)
    assert code == 1
    err = [line for line in err if "Loading model" not in line]
    assert len(err) == 1 and err[0].startswith(f"error: {config}: ") and message in err[0], err
    assert not out.exists()


def test_config_errors_from_objects_keep_their_message():
    """A dict (no file) gets no file prefix; the shipped yaml still loads."""
    from ldm.model.presets import load_config
    with pytest.raises(ValueError, match=r"^model.params.unet_config.params.model_channels: expected an integer"):
        import yaml
        load_config(yaml.safe_load(_tiny_yaml_with(UNET + ("model_channels",), "32")))
    assert load_config(TINY).unet.model_channels == 32


# ----- Ctrl-C: one line, exit status 130 -----
def interrupt_after(monkeypatch, script: str, calls_ok: int) -> None:
    """Make the script's ``generate`` raise KeyboardInterrupt on call ``calls_ok + 1``."""
    import importlib
    module = importlib.import_module(f"ldm.apps.{script}")
    real = module.sample_and_save

    def wrapper(opt, batches, gen, noise, generate, caption, dtype, model):
        calls = []

        def interrupted(prompts, start):
            calls.append(1)
            if len(calls) > calls_ok:
                raise KeyboardInterrupt
            return generate(prompts, start)
        return real(opt, batches, gen, noise, interrupted, caption, dtype, model)
    monkeypatch.setattr(module, "sample_and_save", wrapper)


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_says_which_images_were_written(script, monkeypatch, inputs, tmp_path, capsys):
    interrupt_after(monkeypatch, script, calls_ok=1)
    out = tmp_path / "out"
    code, err = run_main(script, script_argv(script, inputs, out) + ["--n_iter", "3"], capsys)
    assert code == 130
    sample = os.path.join(str(out), "samples", "00000.png")
    assert err[-1] == f"interrupted: 1 image(s) written ({sample}); no grid", err
    assert not any("Traceback" in line or line.startswith("error") for line in err)
    assert tree(out) == ["samples/00000.png"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_before_any_image(script, monkeypatch, inputs, tmp_path, capsys):
    interrupt_after(monkeypatch, script, calls_ok=0)
    out = tmp_path / "out"
    code, err = run_main(script, script_argv(script, inputs, out), capsys)
    assert code == 130 and err[-1] == "interrupted: no image was written", err
    assert tree(out) == []


def test_ctrl_c_while_loading_and_with_debug(monkeypatch, inputs, tmp_path, capsys):
    import ldm.apps.txt2img as txt2img

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(txt2img, "build_model", stop)
    out = tmp_path / "out"
    code, err = run_main("txt2img", script_argv("txt2img", inputs, out), capsys)
    assert code == 130 and err[-1] == "interrupted: no image was written", err
    with pytest.raises(KeyboardInterrupt):  # --debug shows the traceback instead
        run_main("txt2img", script_argv("txt2img", inputs, out) + ["--debug"], capsys)


# ----- the benchmark's own flags: argparse's one-line usage error -----
@pytest.mark.parametrize("flags,message", [
    (["--batch", "1,x"], "--batch takes batch sizes such as 1,2,4: got '1,x'"),
    (["--batch", ""], "--batch takes batch sizes such as 1,2,4: got ''"),
    (["--batch", "0"], "--batch sizes must be 1 or more: got '0'"),
    (["--batch", "2,-1"], "--batch sizes must be 1 or more: got '2,-1'"),
    (["--outdir", "FILE"], "--outdir FILE cannot be used: FILE is a file, not a folder"),
    (["--outdir", "FILE/sub"], "--outdir FILE/sub cannot be used: FILE is a file, not a folder"),
    (["--cache_dir", "FILE"], "--cache_dir FILE cannot be used: FILE is a file, not a folder"),
    (["--steps", "0"], "--steps 0 must be at least 1"),
    (["--n_iter", "0"], "--n_iter 0 must be at least 1"),
    (["--H", "500"], "--H 500 must be a positive multiple of 8"),
    (["--seed", str(2**64)], f"--seed {2**64} is out of range: torch's generator takes -2**63 to 2**64 - 1"),
    (["--memory_budget_gb", "nan"], "--memory_budget_gb nan must be a finite number"),
    (["--run_timeout", "0"], "--run_timeout 0.0 must be more than 0"),
])
def test_benchmark_flags_are_usage_errors(flags, message, tmp_path, capsys):
    from ldm.benchmark import harness
    file = tmp_path / "file"
    file.write_text("keep me")
    flags = [f.replace("FILE", str(file)) for f in flags]
    with pytest.raises(SystemExit) as e:
        harness.parse_args(["--random", "tiny", "--outdir", str(tmp_path / "out"), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: ldm-benchmark") and err[-1] == "ldm-benchmark: error: " + message.replace(
        "FILE", str(file)), err
    assert file.read_text() == "keep me" and not (tmp_path / "out").exists()


def test_benchmark_good_flags_pass(tmp_path):
    from ldm.benchmark import harness
    opt = harness.parse_args(["--random", "tiny", "--batch", "1, 2,4", "--outdir", str(tmp_path / "new" / "out")])
    assert opt.batch == "1, 2,4"
