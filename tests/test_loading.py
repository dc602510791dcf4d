"""Loading: both layouts, strict key checks, safe unpickling, the original public API."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from conftest import SD2, TINY, build
from ldm.weights.reading import CheckpointError, read_checkpoint
from ldm.weights.layout import detect_layout, to_native, to_original
from ldm.weights.loading import load_model


def _unet_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 77, 64, generator=g)
    return model.apply_model(x, torch.tensor([10, 900]), c)


@pytest.fixture(scope="module")
def source():
    return build(TINY, seed=3)


@pytest.fixture(scope="module")
def files(source, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    native = {k: v.clone() for k, v in source.state_dict().items()}
    orig = to_original(native)
    paths = {"orig_ckpt": d / "orig.ckpt", "native_ckpt": d / "native.ckpt",
             "orig_st": d / "orig.safetensors", "native_st": d / "native.safetensors"}
    torch.save({"state_dict": orig, "global_step": 470000}, paths["orig_ckpt"])
    torch.save({"state_dict": native}, paths["native_ckpt"])
    save_file(orig, paths["orig_st"])
    save_file(native, paths["native_st"])
    return paths


def test_layout_roundtrip_is_exact(source):
    native = source.state_dict()
    orig = to_original(native)
    assert detect_layout(orig) == "original" and detect_layout(native) == "native_mha"
    assert any(k.endswith("attn1.to_q.weight") for k in orig)
    back = to_native(orig)
    assert set(back) == set(native)
    for k in native:
        assert torch.equal(back[k], native[k]), k


@pytest.mark.parametrize("name", ["orig_ckpt", "native_ckpt", "orig_st", "native_st"])
def test_every_layout_and_format_gives_identical_outputs(source, files, name):
    model, report = load_model(TINY, files[name])
    assert report.layout == ("original" if name.startswith("orig") else "native_mha")
    with torch.no_grad():
        assert torch.equal(_unet_out(model), _unet_out(source))
        c = model.get_learned_conditioning(["a photo of a cat"])
        assert torch.equal(c, source.get_learned_conditioning(["a photo of a cat"]))
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        assert torch.equal(model.decode_first_stage(z), source.decode_first_stage(z))
    assert not any(t.is_meta for t in model.state_dict().values())


def test_dtype_and_backend_on_load(files):
    model, _ = load_model(TINY, files["native_st"], dtype=torch.bfloat16, attention="math")
    unet = model.model.diffusion_model
    assert unet.dtype == torch.bfloat16 and model.alphas_cumprod.dtype == torch.float32
    out = _unet_out(model)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(m.backend == "math" for m in unet.modules() if hasattr(m, "backend"))


def _save(sd, path):
    torch.save({"state_dict": sd}, path)
    return path


def test_missing_key_is_named(source, tmp_path):
    sd = to_original(source.state_dict())
    del sd["model.diffusion_model.out.2.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): model\.diffusion_model\.out\.2\.bias"):
        load_model(TINY, _save(sd, tmp_path / "m.ckpt"))


def test_unknown_key_is_named(source, tmp_path):
    sd = dict(source.state_dict())
    sd["model.diffusion_model.bogus.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): model\.diffusion_model\.bogus\.weight"):
        load_model(TINY, _save(sd, tmp_path / "u.ckpt"))


def test_shape_mismatch_is_named(source, tmp_path):
    sd = dict(source.state_dict())
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*out\.2\.bias \(5,\) vs model \(4,\)"):
        load_model(TINY, _save(sd, tmp_path / "s.ckpt"))


def test_training_extras_are_ignored_and_schedule_may_be_absent(source, tmp_path):
    sd = to_original(source.state_dict())
    for name in ("betas", "alphas_cumprod", "posterior_variance"):
        del sd[name]
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["lvlb_weights"] = torch.ones(1000)
    model, report = load_model(TINY, _save(sd, tmp_path / "e.ckpt"))
    assert "model_ema.decay" in report.dropped and "lvlb_weights" in report.dropped
    assert torch.allclose(model.alphas_cumprod, source.alphas_cumprod)


def test_ema_weights_are_taken_when_asked(source, tmp_path):
    sd = to_original(source.state_dict())
    for k in [k for k in sd if k.startswith("model.")]:
        sd["model_ema." + k[len("model."):].replace(".", "")] = sd[k] * 0.5
    path = _save(sd, tmp_path / "ema.ckpt")
    live, _ = load_model(TINY, path)
    ema, _ = load_model(TINY, path, ema=True)
    w = "model.diffusion_model.out.2.weight"
    assert torch.equal(ema.state_dict()[w], live.state_dict()[w] * 0.5)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_checkpoint(path)
    assert not marker.exists()


def test_lightning_callbacks_and_numpy_scalars_are_allowed(source, tmp_path):
    np = pytest.importorskip("numpy")
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:  # what real SD 1.x .ckpt files pickle next to the weights
        def __init__(self):
            self.best_model_score = torch.tensor(0.1)
            self.monitor = "val/loss"

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__]
    for n in names[:2]:
        sys.modules.setdefault(n, types.ModuleType(n))
    sys.modules[mod.__name__] = mod
    try:
        path = tmp_path / "lightning.ckpt"
        torch.save({"state_dict": to_original(source.state_dict()), "global_step": np.int64(840000),
                    "callbacks": {ModelCheckpoint: ModelCheckpoint()}}, path)
    finally:
        for n in names:
            sys.modules.pop(n, None)
    model, _ = load_model(TINY, path)
    assert torch.equal(_unet_out(model), _unet_out(source))


@pytest.mark.parametrize("content", [b"this is not a checkpoint\n", b""])
def test_non_checkpoints_are_one_line_errors(tmp_path, content):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value)


def test_truncated_safetensors(files, tmp_path):
    data = open(files["native_st"], "rb").read()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(TINY, path)


def test_missing_file():
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(TINY, "/nonexistent/model.ckpt")


def test_original_public_api(source, files):
    """A script written against the original ldm keeps working."""
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(TINY)
    model = instantiate_from_config(config.model)
    pl_sd = torch.load(files["orig_ckpt"], map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(pl_sd["state_dict"], strict=False)
    assert missing == [] and unexpected == []
    model = model.cpu().eval()
    model.cond_stage_model.device = "cpu"
    assert model.model.diffusion_model.dtype == torch.float32
    assert model.first_stage_model is not None
    with torch.no_grad(), model.ema_scope():
        c = model.get_learned_conditioning(["a photo"])
        assert c.shape == (1, 77, 64)
        assert torch.equal(_unet_out(model), _unet_out(source))
        x = torch.rand(1, 3, 64, 64) * 2 - 1
        posterior = model.encode_first_stage(x)
        z = model.get_first_stage_encoding(posterior, generator=torch.Generator().manual_seed(0))
        assert z.shape == (1, 4, 8, 8)
        assert torch.allclose(z, model.scale_factor * (posterior.mean + posterior.std * torch.randn(
            z.shape, generator=torch.Generator().manual_seed(0))))
        assert model.decode_first_stage(z).shape == (1, 3, 64, 64)


def test_original_yaml_builds_unchanged_with_exact_key_set():
    """configs/stable-diffusion/v2-inference.yaml (the original file) gives a real SD2 checkpoint's keys and shapes."""
    from ldm.model.presets import load_config
    from ldm.model.diffusion import LatentDiffusion
    ref = {}
    with open(os.path.join(os.path.dirname(__file__), "data", "sd2-v2-inference.state_dict.txt")) as f:
        for line in f:
            k, shape, _ = line.rstrip("\n").split("\t")
            ref[k] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    with torch.device("meta"):
        model = LatentDiffusion(load_config(SD2))
    ours = {k: tuple(v.shape) for k, v in to_original(model.state_dict()).items()}
    assert len(ref) == 1240 and ours == ref


def test_config_errors_are_clear():
    from ldm.model.diffusion import DiffusionConfig
    from omegaconf import OmegaConf
    params = OmegaConf.to_container(OmegaConf.load(TINY).model.params)
    params["unet_config"]["params"]["num_res_blockz"] = 2
    with pytest.raises(ValueError, match="UNetModel: unknown config key.*num_res_blockz"):
        DiffusionConfig.from_params(params)
    params = OmegaConf.to_container(OmegaConf.load(TINY).model.params)
    params["parameterization"] = "x0"
    with pytest.raises(ValueError, match="parameterization='x0'"):
        DiffusionConfig.from_params(params)


def test_read_shapes_reads_no_data_and_detects_alike(files):
    """Config detection reads a .safetensors header only (meta tensors); keys, shapes and the guess are the same."""
    from ldm.weights.detect import guess_config
    from ldm.weights.reading import read_shapes
    for name in ("orig_st", "native_st", "orig_ckpt"):
        full, shapes = read_checkpoint(files[name])[0], read_shapes(files[name])
        assert {k: tuple(v.shape) for k, v in shapes.items()} == {k: tuple(v.shape) for k, v in full.items()}
        assert all(v.is_meta for v in shapes.values()) == name.endswith("_st")
        assert guess_config(shapes) == guess_config(full)


def test_load_model_prepares_the_state_dict_once(files, monkeypatch):
    """The fast path renames and checks keys once, and returns the class the yaml names (original load_state_dict)."""
    from ldm.models.diffusion.ddpm import LatentDiffusion
    from ldm.weights import loading
    calls = []
    real = loading.prepare_state_dict
    monkeypatch.setattr(loading, "prepare_state_dict", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, report = load_model(TINY, files["orig_st"])
    assert calls == [1] and type(model) is LatentDiffusion and report.converted
    model.load_state_dict(to_original(model.state_dict()))  # the original API's either-layout load still works
    assert len(calls) == 2
