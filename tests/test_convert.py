"""Checkpoint conversion (ldm.weights.convert, ldm.apps.convert = scripts/convert_checkpoint.py, ldm.apps.random_checkpoint)."""

from __future__ import annotations

import builtins
import errno
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, SD2, TINY, build
from ldm.apps.convert import main, parser, summary
from ldm.fileio import DiskSpaceError
from ldm.model.schedule import BUFFER_NAMES
from ldm.weights.convert import UsageError, convert
from ldm.weights.families import describe as model_family
from ldm.weights.layout import detect_layout, to_native, to_original
from ldm.weights.loading import load_model
from ldm.weights.reading import CheckpointError, read_checkpoint, take_ema

SCRIPT = os.path.join(ROOT, "scripts", "convert_checkpoint.py")
UNET_W = "model.diffusion_model.out.2.weight"


@pytest.fixture(scope="module")
def model():
    return build(TINY, seed=5)


@pytest.fixture(scope="module")
def orig(model):
    """The model's weights in the original layout, each tensor with its own storage."""
    return {k: v.clone() for k, v in to_original(model.state_dict()).items()}


def _ema(orig):
    """LitEma's names (model.X.Y -> model_ema.XY), holding half the live weights."""
    return {"model_ema." + k[6:].replace(".", ""): v * 0.5 for k, v in orig.items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def src(orig, tmp_path_factory):
    """A Lightning-style training checkpoint: EMA copies, loss weights, optimizer state, global_step."""
    sd = dict(orig, **_ema(orig))
    sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(100, dtype=torch.int32),
               "lvlb_weights": torch.ones(1000)})
    path = tmp_path_factory.mktemp("src") / "src.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000, "epoch": 3, "optimizer_states": [{"state": {}}]}, path)
    return path


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- layouts and formats

@pytest.mark.parametrize("mid,back", [(".ckpt", ".ckpt"), (".safetensors", ".pt"), (".pth", ".safetensors")])
def test_roundtrip_is_bit_identical(src, orig, tmp_path, mid, back):
    convert(src, tmp_path / f"native{mid}")
    native, _ = read_checkpoint(tmp_path / f"native{mid}")
    assert detect_layout(native) == "native_mha" and set(native) == set(to_native(orig))
    report = convert(tmp_path / f"native{mid}", tmp_path / f"back{back}", to="original")
    assert (report.layout_in, report.layout_out) == ("native_mha", "original")
    again, _ = read_checkpoint(tmp_path / f"back{back}")
    assert set(again) == set(orig)
    for k, v in orig.items():
        assert again[k].dtype == v.dtype and torch.equal(again[k], v), k


def test_ckpt_output_is_a_plain_state_dict_that_loads(src, model, tmp_path):
    out = tmp_path / "model_native_mha.ckpt"
    convert(src, out)
    obj = torch.load(out, weights_only=True)
    assert list(obj) == ["state_dict"]
    native = model.state_dict()
    assert set(obj["state_dict"]) == set(native)
    for k, v in native.items():
        assert torch.equal(obj["state_dict"][k], v), k
    loaded, report = load_model(TINY, out)
    assert report.layout == "native_mha" and torch.equal(loaded.state_dict()[UNET_W], native[UNET_W])


def test_safetensors_metadata_and_reader(src, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    out = tmp_path / "m.safetensors"
    convert(src, out, dtype="bf16")
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert meta["layout"] == "native_mha" and meta["source"] == "src.ckpt" and meta["dtype"] == "bf16"
    ours, _ = read_checkpoint(out)
    theirs = load_file(out)  # the safetensors library accepts what write_safetensors streamed
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_same_layout_is_copied_unchanged(src, tmp_path):
    convert(src, tmp_path / "a.ckpt")
    report = convert(tmp_path / "a.ckpt", tmp_path / "b.safetensors", to="native")
    assert report.layout_in == report.layout_out == "native_mha" and "unchanged" in "\n".join(summary(report))
    a, _ = read_checkpoint(tmp_path / "a.ckpt")
    b, _ = read_checkpoint(tmp_path / "b.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- extras, EMA, dtypes

def test_training_entries_are_dropped_and_listed(src, tmp_path):
    report = convert(src, tmp_path / "m.ckpt")
    ema_count = len([k for k in report.dropped if k.startswith("model_ema.")])
    assert ema_count == len(_ema(read_checkpoint(src)[0])) + 2  # + decay, num_updates
    assert "lvlb_weights" in report.dropped
    assert {"global_step", "epoch", "optimizer_states"} <= set(report.not_carried)
    text = "\n".join(summary(report))
    assert f"model_ema.* ({ema_count})" in text and "global_step" in text and "lvlb_weights" in text
    out, _ = read_checkpoint(tmp_path / "m.ckpt")
    assert not any(k.startswith("model_ema.") or k == "lvlb_weights" for k in out)


def test_ema_weights_replace_the_unet(src, orig, tmp_path):
    convert(src, tmp_path / "ema.ckpt", ema=True, to="original")
    out, _ = read_checkpoint(tmp_path / "ema.ckpt")
    assert set(out) == set(orig)
    for k, v in orig.items():
        assert torch.equal(out[k], v * 0.5 if k.startswith("model.") else v), k


def test_ema_mapping_is_strict(orig):
    sd = dict(orig, **_ema(orig))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        take_ema(orig)
    missing = dict(sd)
    del missing["model_ema.diffusion_modelout2weight"]
    with pytest.raises(CheckpointError, match="without an EMA copy.*out.2.weight"):
        take_ema(missing)
    with pytest.raises(CheckpointError, match="without a UNet weight.*model_ema.stray"):
        take_ema(dict(sd, **{"model_ema.stray": torch.zeros(1)}))
    bad = dict(sd, **{"model_ema.diffusion_modelout2weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="shape differs"):
        take_ema(bad)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dtype_casts_weights_only(orig, tmp_path, dtype):
    path = tmp_path / "src.safetensors"
    ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"  # non-floating, as in SD 1.x files
    from safetensors.torch import save_file
    save_file(dict(orig, **{ids: torch.arange(77).unsqueeze(0)}), path)
    convert(path, tmp_path / "out.ckpt", dtype=dtype)
    out, _ = read_checkpoint(tmp_path / "out.ckpt")
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert out[ids].dtype == torch.int64 and torch.equal(out[ids], torch.arange(77).unsqueeze(0))
    for name in BUFFER_NAMES:  # the noise schedule keeps full precision
        assert out[name].dtype == torch.float32 and torch.equal(out[name], orig[name])
    floats = [k for k in out if k not in BUFFER_NAMES and k != ids]
    assert floats and all(out[k].dtype == want for k in floats)
    assert torch.equal(out[UNET_W], orig[UNET_W].to(want))
    assert _files(tmp_path) == ["out.ckpt", "src.safetensors"]  # the staging file is gone


def test_half_is_fp16():
    assert parser().parse_args(["a.ckpt", "b.ckpt", "--half"]).dtype == "fp16"
    assert parser().parse_args(["a.ckpt", "b.ckpt"]).dtype is None


# ----------------------------------------------------------------------------- --check and reports

def test_check_compares_unet_outputs(src, tmp_path, capsys):
    assert main([str(src), str(tmp_path / "a.ckpt"), "--check", "--config", TINY, "--quiet"]) == 0
    assert "max |difference| = 0 " in capsys.readouterr().out
    half = convert(src, tmp_path / "h.safetensors", dtype="fp16", check=True, config=TINY)
    assert 0 < half.max_diff < 1e-2 * half.ref_scale


def test_check_needs_a_matching_config(src, tmp_path):
    report = convert(src, tmp_path / "auto.ckpt", check=True)  # the tiny config is found from the weights
    assert report.max_diff is not None and report.max_diff <= 1e-5 * report.ref_scale
    os.remove(tmp_path / "auto.ckpt")
    odd = tmp_path / "odd.ckpt"
    sd = torch.load(src, weights_only=True)
    sd = sd.get("state_dict", sd)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 7, 3, 3)  # no known family has 7
    torch.save({"state_dict": sd}, odd)
    with pytest.raises(UsageError, match="--check needs --config"):
        convert(odd, tmp_path / "a.ckpt", check=True)
    os.remove(odd)
    with pytest.raises(UsageError, match="config not found"):
        convert(src, tmp_path / "a.ckpt", check=True, config=str(tmp_path / "nope.yaml"))
    with pytest.raises(CheckpointError, match="shape mismatch"):  # the full SD2 UNet for a tiny checkpoint
        convert(src, tmp_path / "a.ckpt", check=True, config=SD2)
    assert _files(tmp_path) == []  # a failed check keeps the output from being written


def test_family_from_context_width():
    def sd(width):
        return {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                torch.empty(320, width, device="meta")}
    assert model_family(sd(768)).startswith("SD 1.x")
    assert model_family(sd(1024)).startswith("SD 2.x")
    assert "context width 64" in model_family(sd(64))


def test_report_names_family_and_eps_v(src, tmp_path, capsys):
    assert main([str(src), str(tmp_path / "a.ckpt"), "--quiet"]) == 0
    out = capsys.readouterr().out
    # the tiny test model's family, with its two shipped yamls (no _native_mha variant: either loads either layout)
    assert "tiny SD2-shaped test model, context width 64" in out and "eps vs v" in out
    assert "configs/tiny/v2-tiny-v.yaml for v-prediction" in out and "configs/tiny/v2-tiny.yaml for eps" in out


# ----------------------------------------------------------------------------- bad inputs (in-process)

def _run(argv, capsys):
    rc = main([*map(str, argv), "--quiet"])
    err = capsys.readouterr().err
    return rc, err


def _one_line_error(rc, err, code=1):
    assert rc == code and err.startswith("ldm-convert: error: ") and err.count("\n") == 1, (rc, err)


def _save(sd, path):
    torch.save({"state_dict": sd}, path)
    return path


@pytest.mark.parametrize("case", ["missing", "unrelated", "mixed", "diffusers", "bias", "no_ema", "truncated"])
def test_bad_inputs_are_one_line_errors(case, orig, src, tmp_path, capsys):
    out = tmp_path / "out" / "model.ckpt"
    out.parent.mkdir()
    out.write_bytes(b"previous")
    extra = []
    if case == "missing":
        path = tmp_path / "nope.ckpt"
    elif case == "unrelated":
        path = _save({"encoder.layer.0.weight": torch.zeros(3, 3)}, tmp_path / "bert.ckpt")
    elif case == "mixed":
        native = to_native(orig)
        key = next(k for k in orig if k.endswith("attn1.to_q.weight"))
        path = _save(dict(native, **{key: orig[key]}), tmp_path / "mixed.ckpt")
    elif case == "diffusers":
        path = _save({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": torch.zeros(4, 4)},
                     tmp_path / "unet.ckpt")
    elif case == "bias":
        native = to_native(orig)
        key = next(k for k in native if k.endswith("attn1.in_proj_bias"))
        path = _save(dict(native, **{key: torch.ones_like(native[key])}), tmp_path / "bias.ckpt")
        extra = ["--to", "original"]
    elif case == "no_ema":
        path = _save(orig, tmp_path / "live.ckpt")
        extra = ["--ema"]
    else:
        data = src.read_bytes()
        path = tmp_path / "cut.ckpt"
        path.write_bytes(data[: len(data) // 2])
    rc, err = _run([path, out, *extra], capsys)
    _one_line_error(rc, err)
    assert out.read_bytes() == b"previous" and _files(out.parent) == ["model.ckpt"]


def test_bad_command_lines_exit_2(src, tmp_path, capsys):
    _one_line_error(*_run([src, tmp_path / "out.bin"], capsys), code=2)
    _one_line_error(*_run([src, src], capsys), code=2)
    alias = tmp_path / "alias.ckpt"
    os.link(src, alias)
    _one_line_error(*_run([src, alias], capsys), code=2)
    _one_line_error(*_run([src, tmp_path / "no" / "dir.ckpt"], capsys), code=2)
    assert _files(tmp_path) == ["alias.ckpt"]


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        main([str(tmp_path / "nope.ckpt"), str(tmp_path / "out.ckpt"), "--debug"])


def test_failed_write_leaves_nothing_behind(src, tmp_path, monkeypatch):
    out = tmp_path / "model.ckpt"
    out.write_bytes(b"previous")

    def broken_save(obj, f):
        f.write(b"PK partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        convert(src, out)
    assert out.read_bytes() == b"previous" and _files(tmp_path) == ["model.ckpt"]


# ----------------------------------------------------------------------------- bad inputs (the CLI, as a subprocess)

class _Exec:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.fixture(scope="module")
def cli_errors(src, tmp_path_factory):
    """Every bad file through the real CLI, the processes run side by side to keep the suite fast."""
    d = tmp_path_factory.mktemp("cli")
    cases = {}
    (d / "text.ckpt").write_text("this is not a checkpoint\n")
    cases["text"] = d / "text.ckpt"
    from safetensors.torch import save_file
    save_file({"a": torch.randn(64, 64)}, d / "full.safetensors")
    data = (d / "full.safetensors").read_bytes()
    (d / "cut.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated_safetensors"] = d / "cut.safetensors"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _System(f"touch {d / 'marker_system'}")},
               d / "evil.ckpt")
    cases["torch_save_os_system"] = d / "evil.ckpt"
    (d / "evil_raw.ckpt").write_bytes(pickle.dumps(
        {"state_dict": _Exec(f"open({str(d / 'marker_exec')!r}, 'w').close()")}, protocol=2))
    cases["raw_pickle_exec"] = d / "evil_raw.ckpt"
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = {name: subprocess.Popen([sys.executable, SCRIPT, str(path), str(d / f"out_{name}.ckpt")], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, path in cases.items()}
    results = {name: (p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for name, p in procs.items()}
    for p in procs.values():
        p.stdout.close()
        p.stderr.close()
    return d, results


@pytest.mark.parametrize("name", ["text", "truncated_safetensors", "torch_save_os_system", "raw_pickle_exec"])
def test_cli_bad_files(cli_errors, name):
    d, results = cli_errors
    rc, out, err = results[name]
    assert rc == 1 and out == "" and "Traceback" not in err, err
    assert err.startswith("ldm-convert: error: ") and err.count("\n") == 1, err
    assert not (d / "marker_system").exists() and not (d / "marker_exec").exists()
    assert not [p for p in os.listdir(d) if p.startswith(("out_", ".out_"))]
    if "os_system" in name or "exec" in name:
        assert "refusing to load" in err


# ----------------------------------------------------------------------------- make_random_checkpoint and packaging

@pytest.fixture(scope="module")
def make_random():
    from ldm.apps.random_checkpoint import make_random_checkpoint
    return make_random_checkpoint


def test_random_checkpoint_is_seeded_and_layouts_agree(make_random, tmp_path):
    make_random(str(tmp_path / "a.safetensors"), TINY, seed=1, progress=False)
    make_random(str(tmp_path / "b.safetensors"), TINY, seed=1, progress=False)
    make_random(str(tmp_path / "c.safetensors"), TINY, seed=2, progress=False)
    make_random(str(tmp_path / "n.ckpt"), TINY, layout="native_mha", seed=1, progress=False)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    a, _ = read_checkpoint(tmp_path / "a.safetensors")
    c, _ = read_checkpoint(tmp_path / "c.safetensors")
    n, _ = read_checkpoint(tmp_path / "n.ckpt")
    assert detect_layout(a) == "original" and not torch.equal(a[UNET_W], c[UNET_W])
    native = to_native(a)
    assert set(n) == set(native) and all(torch.equal(n[k], native[k]) for k in n)
    model, _ = load_model(TINY, tmp_path / "n.ckpt")  # strict: the key set is the model's
    assert torch.isfinite(model.state_dict()[UNET_W]).all()
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors", "c.safetensors", "n.ckpt"]


def test_random_checkpoint_dtype_and_native_safetensors(make_random, tmp_path, monkeypatch):
    """--dtype and --layout native_mha to .safetensors: the cast of the same seeded weights, buffers kept float32."""
    make_random(str(tmp_path / "a.safetensors"), TINY, seed=3, progress=False)
    make_random(str(tmp_path / "h.safetensors"), TINY, layout="native_mha", dtype="fp16", seed=3, progress=False)
    a, _ = read_checkpoint(tmp_path / "a.safetensors")
    h, meta = read_checkpoint(tmp_path / "h.safetensors")
    native = to_native(a)
    assert set(h) == set(native) and meta["layout"] == "native_mha"
    for k, v in native.items():
        want = v if k in BUFFER_NAMES or not v.is_floating_point() else v.half()
        assert h[k].dtype == want.dtype and torch.equal(h[k], want), k
    make_random(str(tmp_path / "h.ckpt"), TINY, layout="native_mha", dtype="fp16", seed=3, progress=False)
    make_random(str(tmp_path / "o.safetensors"), TINY, dtype="bf16", seed=3, progress=False)  # streamed and cast
    hc, _ = read_checkpoint(tmp_path / "h.ckpt")
    o, _ = read_checkpoint(tmp_path / "o.safetensors")
    assert set(hc) == set(h) and all(hc[k].dtype == h[k].dtype and torch.equal(hc[k], h[k]) for k in h)
    assert set(o) == set(a) and all(torch.equal(o[k], a[k] if k in BUFFER_NAMES or not a[k].is_floating_point()
                                                else a[k].bfloat16()) for k in a)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    monkeypatch.setitem(make_random.__globals__, "random_tensor", lambda *a: pytest.fail("drew before the disk check"))
    with pytest.raises(DiskSpaceError, match="not enough disk space"):
        make_random(str(tmp_path / "big.ckpt"), TINY, seed=3, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "h.ckpt", "h.safetensors", "o.safetensors"]


def test_atomic_write_refuses_a_full_disk(tmp_path, monkeypatch):
    """Too little free space: one-line error before writing; ENOSPC half-way: one line, no partial file."""
    from ldm.fileio import atomic_write
    target = tmp_path / "out.ckpt"
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(DiskSpaceError, match=r"not enough disk space .* needs about .* GB are free"):
        atomic_write(str(target), lambda f, _tmp: f.write(b"x"), need=free + 10**12)

    def fill(f, _tmp):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskSpaceError, match="the disk filled up while writing .*nothing was written"):
        atomic_write(str(target), fill)
    assert os.listdir(tmp_path) == []
    assert atomic_write(str(target), lambda f, _tmp: f.write(b"abc"), need=3) == 3 and target.read_bytes() == b"abc"

    def torch_save_full(f, _tmp):  # what torch.save raises on a full disk (seen on a 1 MB tmpfs)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    def other_failure(f, _tmp):
        raise RuntimeError("some other failure")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(free=4096))
    with pytest.raises(DiskSpaceError, match="the disk filled up"):
        atomic_write(str(tmp_path / "full.ckpt"), torch_save_full)
    with pytest.raises(RuntimeError, match="some other failure"):  # not a write failure: left as it is
        atomic_write(str(tmp_path / "full.ckpt"), other_failure)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room left it is some other failure
        atomic_write(str(tmp_path / "full.ckpt"), torch_save_full)
    assert os.listdir(tmp_path) == ["out.ckpt"]


def test_make_random_checkpoint_errors_are_one_line(tmp_path, capsys):
    from helpers import script_main
    assert script_main("make_random_checkpoint")([str(tmp_path / "x.txt"), "--config", TINY, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("make_random_checkpoint: error: unknown output suffix") and "\n" not in err
    start = time.perf_counter()  # a missing folder is refused before the weights are drawn
    assert script_main("make_random_checkpoint")([str(tmp_path / "no" / "x.ckpt"), "--quiet"]) == 2
    assert time.perf_counter() - start < 5
    assert "output folder does not exist" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_console_entry_point():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["ldm-convert"] == "ldm.apps.convert:main"
