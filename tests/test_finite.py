"""ldm.apps.finite: the stage that went non-finite is named, read once after the loop; clean runs report nothing."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import TINY, build
from ldm.apps.finite import FiniteWatch
from ldm.models.diffusion.ddim import DDIMSampler


@pytest.fixture()
def model():
    return build(TINY, seed=2)


def _generate(model, steps=3):
    c = model.get_learned_conditioning(["a cat"])
    uc = model.get_learned_conditioning([""])
    x, _ = DDIMSampler(model).sample(S=steps, conditioning=c, batch_size=1, shape=[4, 8, 8], verbose=False,
                                     unconditional_guidance_scale=7.5, unconditional_conditioning=uc,
                                     x_T=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    return model.decode_first_stage(x)


def _nan_after(module, calls_ok: int):
    """Make ``module``'s forward return NaN from call ``calls_ok + 1`` on."""
    forward, count = module.forward, [0]

    def patched(*args, **kwargs):
        count[0] += 1
        out = forward(*args, **kwargs)
        return out if count[0] <= calls_ok else torch.full_like(out, float("nan"))
    module.forward = patched


def test_clean_run_reports_nothing_and_the_model_is_restored(model):
    with torch.no_grad(), FiniteWatch(model, per_call=True) as watch:
        img = _generate(model)
        assert watch.first_bad() is None and torch.isfinite(img).all()
        assert len(watch.unet_calls) == 3  # one guided UNet call per DDIM step
    assert "decode_first_stage" not in vars(model) and "get_learned_conditioning" not in vars(model)


@pytest.mark.parametrize("where,calls_ok,want", [
    ("text", 1, "text conditioning"),                        # the unconditional prompt's encoding is NaN
    ("unet", 1, "sampling (first non-finite UNet output at call 2 of 3)"),
    ("decoder", 0, "VAE decode"),
])
def test_the_first_non_finite_stage_is_named(model, where, calls_ok, want):
    part = {"text": model.cond_stage_model, "unet": model.model.diffusion_model,
            "decoder": model.first_stage_model.decoder}[where]
    _nan_after(part, calls_ok)
    with torch.no_grad(), warnings.catch_warnings(), FiniteWatch(model, per_call=True) as watch:
        warnings.simplefilter("ignore")  # the decoder's own fp32 redo warns about the non-finite values, then fails
        _generate(model)
        assert watch.first_bad() == want
        watch.reset()
        assert watch.first_bad() is None


# ----- through the scripts: no silent NaN/black image -----

def _nan_model(monkeypatch, app, part: str):
    """The script ``app``'s main, its model's ``part`` (a dotted attribute path) giving NaN from the first call."""
    real = app.build_model

    def build(opt, rt, *args, **kwargs):
        model, name = real(opt, rt, *args, **kwargs)
        module = model
        for attr in part.split("."):
            module = getattr(module, attr)
        _nan_after(module, 0)
        return model, name
    monkeypatch.setattr(app, "build_model", build)
    return app.main


@pytest.fixture()
def nan_unet(monkeypatch):
    """txt2img's model with a UNet whose every output is NaN (as an fp16 overflow would make it)."""
    from ldm.apps import txt2img
    return _nan_model(monkeypatch, txt2img, "model.diffusion_model")


def _argv(tmp_path, *extra):
    return ["--demo", "--prompt", "a cat", "--n_iter", "1", "--n_samples", "1", "--steps", "2",
            "--outdir", str(tmp_path), "--device", "cpu", *extra]


def _pngs(tmp_path):
    return sorted(p.name for p in tmp_path.rglob("*.png"))


def test_txt2img_refuses_a_nan_image_naming_the_stage(nan_unet, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert nan_unet(_argv(tmp_path)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the sampling went non-finite (NaN or inf) for 'a cat'") and \
        "no image was written" in err[-1] and "--keep_nonfinite" in err[-1]
    assert _pngs(tmp_path) == []


def test_keep_nonfinite_saves_it_and_debug_finds_the_first_unet_call(nan_unet, tmp_path):
    from ldm.apps.cli import UserError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match=r"sampling \(first non-finite UNet output at call 1 of 2\)"):
            nan_unet(_argv(tmp_path / "debug", "--debug"))
        assert _pngs(tmp_path) == []
        assert nan_unet(_argv(tmp_path / "kept", "--keep_nonfinite")) == 0
    assert _pngs(tmp_path / "kept") == ["00000.png", "grid-0000.png"]


def test_nested_watches_restore_what_was_there(model):
    outer = FiniteWatch(model)
    inner = FiniteWatch(model)
    inner.close()
    assert model.decode_first_stage.__name__ == "wrapper"  # the outer watch's wrapper is back
    outer.close()
    assert "decode_first_stage" not in vars(model)


def test_img2img_names_a_non_finite_encode(monkeypatch, tmp_path, capsys):
    """The init image's VAE encode runs once before the passes: a NaN there is named as the encode."""
    from PIL import Image
    from ldm.apps import img2img
    main = _nan_model(monkeypatch, img2img, "first_stage_model.encoder")
    Image.new("RGB", (64, 64), (120, 30, 200)).save(tmp_path / "in.png")
    argv = ["--demo", "--prompt", "x", "--init-img", str(tmp_path / "in.png"), "--n_iter", "1", "--n_samples", "1",
            "--ddim_steps", "2", "--outdir", str(tmp_path / "out"), "--device", "cpu"]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: the VAE encode of the init image went non-finite (NaN or inf); nothing was written")
    assert _pngs(tmp_path / "out") == []
