"""Reliability, round 2: checkpoints are read as what they hold (compressed zips, damaged records), both CLIP key
forms load, dtype kinds are strict, fp16 overflow is refused or clamped, and killed writers leave no litter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
import zipfile

import pytest
import torch

from conftest import ROOT, TINY, build
from ldm.apps.convert import main, summary
from ldm.fileio import STALE_AFTER, atomic_write, partial_file, remove_stale_partials
from ldm.weights.convert import convert
from ldm.weights.layout import canonical_text_keys, text_key, to_original
from ldm.weights.loading import load_model
from ldm.weights.reading import CheckpointError, check_zip, read_checkpoint, read_shapes

V1 = os.path.join(ROOT, "configs", "tiny", "v1-tiny.yaml")
UNET_W = "model.diffusion_model.out.2.weight"
UNET_B = "model.diffusion_model.out.2.bias"
CLIP = "cond_stage_model.transformer.text_model."
POSITION_IDS = CLIP + "embeddings.position_ids"


@pytest.fixture(scope="module")
def source():
    return build(TINY, seed=11)


@pytest.fixture(scope="module")
def orig(source):
    return {k: v.clone() for k, v in to_original(source.state_dict()).items()}


def _rezip(src, dst, compression, cut: str | None = None):
    """``src`` (a torch.save zip) rewritten member by member with ``compression``, names kept; the record
    whose name ends with ``cut`` loses its last 4 bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compression) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info.filename, data[:-4] if cut and info.filename.endswith(cut) else data)
    return dst


@pytest.fixture(scope="module")
def zips(orig, tmp_path_factory):
    d = tmp_path_factory.mktemp("zips")
    stored = d / "stored.ckpt"
    torch.save({"state_dict": orig, "global_step": 7}, stored)
    return {"stored": stored, "deflate": _rezip(stored, d / "deflate.ckpt", zipfile.ZIP_DEFLATED),
            "restored": _rezip(stored, d / "restored.ckpt", zipfile.ZIP_STORED)}  # stored, 64-byte alignment lost


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and text
    return text


def _all_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- 1. read as what they hold

def test_deflate_zip_gives_exactly_the_stored_tensors(zips, orig):
    with zipfile.ZipFile(zips["deflate"]) as z:
        data = [i for i in z.infolist() if "/data/" in i.filename]
        assert data and all(i.compress_type == zipfile.ZIP_DEFLATED for i in data)
    try:  # the bug this guards against: mmap reads the compressed bytes as tensor data
        raw = torch.load(zips["deflate"], weights_only=True, mmap=True)["state_dict"]
        assert not all(torch.equal(raw[k], orig[k]) for k in orig)
    except RuntimeError:
        pass
    assert check_zip(str(zips["stored"])) is True  # torch's own writer: stored, aligned, mmap'd
    assert check_zip(str(zips["deflate"])) is False and check_zip(str(zips["restored"])) is False
    stored, meta = read_checkpoint(zips["stored"])
    _all_equal(stored, orig)
    for name in ("deflate", "restored"):
        sd, meta2 = read_checkpoint(zips[name])
        _all_equal(sd, stored)
        assert meta2 == meta == {"global_step": "7"}
        assert {k: v.shape for k, v in read_shapes(zips[name]).items()} == {k: v.shape for k, v in stored.items()}


def test_deflate_zip_loads_and_converts_alike(zips, tmp_path):
    a, _ = load_model(TINY, zips["stored"])
    b, _ = load_model(TINY, zips["deflate"])
    _all_equal(a.state_dict(), b.state_dict())
    with torch.no_grad():
        assert torch.equal(a.get_learned_conditioning(["a photo"]), b.get_learned_conditioning(["a photo"]))
    convert(zips["stored"], tmp_path / "from_stored.safetensors")
    convert(zips["deflate"], tmp_path / "from_deflate.safetensors")
    convert(zips["deflate"], tmp_path / "from_deflate.ckpt")
    want, _ = read_checkpoint(tmp_path / "from_stored.safetensors")
    _all_equal(read_checkpoint(tmp_path / "from_deflate.safetensors")[0], want)
    _all_equal(read_checkpoint(tmp_path / "from_deflate.ckpt")[0], want)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_short_record_is_one_line_naming_it(zips, tmp_path, compression):
    with zipfile.ZipFile(zips["stored"]) as z:
        record = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    path = _rezip(zips["stored"], tmp_path / "short.ckpt", compression, cut="/data/0")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert _one_line(e) == (f"damaged checkpoint {path}: record {record.filename} holds {record.file_size - 4} "
                            f"bytes, its tensor data needs {record.file_size}")
    with pytest.raises(CheckpointError, match="record stored/data/0 holds"):
        load_model(TINY, path)


def test_truncated_zip_and_legacy_pickle(zips, orig, tmp_path):
    data = zips["stored"].read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(cut)
    assert _one_line(e).startswith(f"not a readable checkpoint: {cut}")
    legacy = tmp_path / "legacy.ckpt"  # torch < 1.6 files: no zip, nothing to mmap
    torch.save({"state_dict": orig}, legacy, _use_new_zipfile_serialization=False)
    _all_equal(read_checkpoint(legacy)[0], orig)


def test_missing_record_is_refused(zips, tmp_path):
    path = tmp_path / "gap.ckpt"
    with zipfile.ZipFile(zips["stored"]) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/data/3"):
                zout.writestr(info.filename, zin.read(info.filename))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert _one_line(e) == f"damaged checkpoint {path}: tensor record stored/data/3 is missing"


# ----------------------------------------------------------------------------- 2. both CLIP key forms

@pytest.fixture(scope="module")
def v1_files(tmp_path_factory):
    model = build(V1, seed=4)
    d = tmp_path_factory.mktemp("v1")
    canonical = dict(to_original(model.state_dict()), **{POSITION_IDS: torch.arange(77).unsqueeze(0)})
    stripped = {k.replace(CLIP, "cond_stage_model.transformer."): v for k, v in canonical.items()}
    assert sum(k.startswith(CLIP) for k in canonical) == 53 and not any(k.startswith(CLIP) for k in stripped)
    torch.save({"state_dict": canonical}, d / "canonical.ckpt")
    torch.save({"state_dict": stripped}, d / "stripped.ckpt")
    return model, canonical, stripped, d


def test_text_tower_without_text_model_level_loads_alike(v1_files):
    model, _, _, d = v1_files
    a, _ = load_model(V1, d / "canonical.ckpt")
    b, _ = load_model(V1, d / "stripped.ckpt")
    with torch.no_grad():
        want = model.get_learned_conditioning(["a photo"])
        assert torch.equal(a.get_learned_conditioning(["a photo"]), want)
        assert torch.equal(b.get_learned_conditioning(["a photo"]), want)


def test_converter_writes_the_canonical_form(v1_files, tmp_path):
    _, canonical, _, d = v1_files
    convert(d / "stripped.ckpt", tmp_path / "out.safetensors", to="original")
    out, _ = read_checkpoint(tmp_path / "out.safetensors")
    _all_equal(out, canonical)  # position_ids kept, as the converter always did


def test_rename_table(v1_files):
    assert text_key("cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight") == \
        CLIP + "encoder.layers.0.mlp.fc1.weight"
    assert text_key("conditioner.embedders.0.transformer.final_layer_norm.bias") == \
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias"
    for unchanged in (CLIP + "embeddings.token_embedding.weight", UNET_W, "cond_stage_model.model.ln_final.weight",
                      "cond_stage_model.transformer.logit_scale"):
        assert text_key(unchanged) == unchanged
    _, canonical, stripped, _ = v1_files
    assert canonical_text_keys(stripped).keys() == canonical.keys()
    both = dict(canonical, **{"cond_stage_model.transformer.final_layer_norm.bias": torch.zeros(64)})
    with pytest.raises(CheckpointError, match=f"weight {CLIP}final_layer_norm.bias twice"):
        canonical_text_keys(both)


def test_original_api_strict_false_names_what_it_ignored(v1_files):
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    _, canonical, _, _ = v1_files
    model = instantiate_from_config(OmegaConf.load(V1).model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete dict loads without a word
        assert model.load_state_dict(canonical, strict=False) == ([], [])
    no_text = {k: v for k, v in canonical.items() if not k.startswith("cond_stage_model.")}
    no_text["stray.weight"] = torch.zeros(1)
    with pytest.warns(UserWarning) as caught:
        missing, unexpected = model.load_state_dict(no_text, strict=False)
    assert len(missing) == 52 and unexpected == ["stray.weight"]
    (w,) = caught
    assert str(w.message) == (
        f"load_state_dict(strict=False) ignored 52 missing key(s): {CLIP}embeddings.token_embedding.weight, "
        f"{CLIP}embeddings.position_embedding.weight, {CLIP}encoder.layers.0.self_attn.q_proj.weight, "
        f"{CLIP}encoder.layers.0.self_attn.q_proj.bias ... (+48 more); 1 unexpected key(s): stray.weight")


# ----------------------------------------------------------------------------- 3. dtype kinds

@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_weights_are_refused_at_load(orig, tmp_path, dtype):
    path = tmp_path / "ints.ckpt"
    torch.save({"state_dict": dict(orig, **{UNET_W: orig[UNET_W].to(dtype)})}, path)
    with pytest.raises(CheckpointError) as e:
        load_model(TINY, path)
    kind = str(dtype).removeprefix("torch.")
    assert _one_line(e) == (f"checkpoint does not match the config: 1 dtype mismatch(es): {UNET_W} {kind} "
                            f"vs model float32")  # (the int64 position_ids of SD 1.x files: test_text_tower_*)
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    model = instantiate_from_config(OmegaConf.load(TINY).model)
    with pytest.raises(CheckpointError, match=f"1 dtype mismatch.*{UNET_W} {kind} vs model float32"):
        model.load_state_dict(dict(orig, **{UNET_W: orig[UNET_W].to(dtype)}), strict=False)


# ----------------------------------------------------------------------------- 4. fp16 overflow

@pytest.fixture(scope="module")
def big(orig, tmp_path_factory):
    """Finite values beyond fp16 in two tensors; 65519 rounds to 65504 and an inf stays inf, neither counted."""
    sd = {k: v.clone() for k, v in orig.items()}
    sd[UNET_W].view(-1)[:4] = torch.tensor([1e5, -7e4, 65519.0, float("inf")])
    sd[UNET_B][0] = 3e5
    path = tmp_path_factory.mktemp("big") / "big.ckpt"
    torch.save({"state_dict": sd}, path)
    return path, sd


def test_fp16_overflow_is_refused_naming_the_tensors(big, tmp_path, capsys):
    path, _ = big
    with pytest.raises(CheckpointError) as e:
        convert(path, tmp_path / "half.ckpt", dtype="fp16")
    assert _one_line(e) == (f"--dtype fp16: 2 tensor(s) hold finite values beyond the fp16 range (+-65504) that "
                            f"would become inf: {UNET_W} (2 value(s)), {UNET_B} (1 value(s)); "
                            f"pass --clamp to clamp them to the range")
    assert main([str(path), str(tmp_path / "half.ckpt"), "--dtype", "fp16", "--quiet"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert os.listdir(tmp_path) == []
    convert(path, tmp_path / "bf16.ckpt", dtype="bf16")  # within bf16's range
    assert main([str(path), str(tmp_path / "x.ckpt"), "--clamp"]) == 2


def test_clamp_clamps_and_says_how_many(big, tmp_path, capsys):
    path, sd = big
    report = convert(path, tmp_path / "half.safetensors", dtype="fp16", clamp=True)
    assert report.clamped == {UNET_W: 2, UNET_B: 1}
    out, _ = read_checkpoint(tmp_path / "half.safetensors")
    w = out[UNET_W].view(-1)
    assert w[:3].tolist() == [65504.0, -65504.0, 65504.0] and w[3].item() == float("inf")
    assert torch.equal(w[4:], sd[UNET_W].view(-1)[4:].half()) and out[UNET_B][0].item() == 65504.0
    assert torch.equal(out[UNET_B][1:], sd[UNET_B][1:].half())
    assert main([str(path), str(tmp_path / "half.ckpt"), "--dtype", "fp16", "--clamp", "--quiet"]) == 0
    assert f"clamped: 3 value(s) in 2 tensor(s) to the fp16 range: {UNET_W}, {UNET_B}\n" in capsys.readouterr().out
    assert "clamped" not in "\n".join(summary(convert(path, tmp_path / "same.ckpt")))


# ----------------------------------------------------------------------------- 5. no litter from killed writers

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_partials_are_removed_and_live_ones_kept(tmp_path):
    target = str(tmp_path / "model.ckpt")
    fd, mine = partial_file(target)
    os.close(fd)
    prefix = os.path.basename(mine).split(".partial-")[1].rsplit(".", 1)[0]  # {host}.{pid}
    host = prefix.split(".")[0]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead, old = _dead_pid(), time.time() - STALE_AFTER - 60
    names = {
        f".model.partial-{host}.{dead}-a1.ckpt": False,                 # its writer died
        f".model.partial-{host}.{dead}-b2.safetensors": False,          # the converter's staging file, same rule
        f".model.partial-{host}.{sleeper.pid}-c3.ckpt": True,           # a live writer, however old the file
        f".model.partial-otherhost.{dead}-d4.ckpt": True,               # another host's, recent: cannot tell
        f".model.partial-otherhost.{dead}-e5.ckpt@old": False,          # another host's, untouched for long
        ".model.partial-k2j4h5g6.ckpt@old": False,                      # named before pids were, old
        ".model.partial-q8w9e0r1.ckpt": True,                           # named before pids were, recent
        f".other.partial-{host}.{dead}-f6.ckpt": True,                  # another target's
    }
    try:
        for name in names:
            p = tmp_path / name.removesuffix("@old")
            p.write_bytes(b"x" * 1000)
            if name.endswith("@old"):
                os.utime(p, (old, old))
        os.utime(mine, (old, old))
        assert atomic_write(target, lambda f, _tmp: f.write(b"new"), need=3) == 3  # a sized write cleans up
        kept = {n.removesuffix("@old") for n, keep in names.items() if keep}
        assert set(os.listdir(tmp_path)) == kept | {"model.ckpt", os.path.basename(mine)}
        assert remove_stale_partials(target) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_partials(target) == [str(tmp_path / f".model.partial-{host}.{sleeper.pid}-c3.ckpt")]


def test_converter_killed_mid_write_leaves_nothing_after_the_next_run(orig, tmp_path):
    src = tmp_path / "src.ckpt"
    torch.save({"state_dict": orig}, src)
    out = tmp_path / "out" / "model.ckpt"
    out.parent.mkdir()
    script = ("import os, signal, sys, torch\n"
              "from ldm.weights.convert import convert\n"
              "def killed(obj, f):\n"
              "    f.write(b'PK' + bytes(1 << 20)); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
              "torch.save = killed\n"
              "convert(sys.argv[1], sys.argv[2], dtype='fp16', progress=False)\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", script, str(src), str(out)], env=env, cwd=ROOT, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    left = sorted(os.listdir(out.parent))
    assert len(left) == 2 and all(n.startswith(".model.partial-") for n in left)
    assert {os.path.splitext(n)[1] for n in left} == {".ckpt", ".safetensors"}  # the write and its staging file
    assert max(os.path.getsize(out.parent / n) for n in left) > 1 << 20
    convert(src, out, dtype="fp16")
    assert os.listdir(out.parent) == ["model.ckpt"]
    assert read_checkpoint(out)[0][UNET_W].dtype == torch.float16


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_a_locked_partial_is_kept_whatever_its_name_says(tmp_path):
    """A writer in another container may share the host name and have a pid that looks dead here: its flock
    decides. Unsized writes (images) do not scan the folder at all."""
    import fcntl
    target = str(tmp_path / "model.ckpt")
    fd, mine = partial_file(target)
    os.close(fd)
    host = os.path.basename(mine).split(".partial-")[1].split(".")[0]
    live = tmp_path / f".model.partial-{host}.{_dead_pid()}-z9.ckpt"
    live.write_bytes(b"x")
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert remove_stale_partials(target) == []
    assert atomic_write(target, lambda f, _tmp: f.write(b"img")) == 3 and live.exists()  # need=0: no scan
    assert remove_stale_partials(target) == [str(live)]  # unlocked now, its pid dead: stale


def test_the_record_scan_makes_no_class_per_global_and_caps_the_pickle(tmp_path, monkeypatch):
    """A hostile data.pkl of many distinct globals costs no memory per global; an oversized one is refused unread."""
    from ldm.weights import reading
    globals_ = b"".join(b"c" + f"m{i}\nn{i}\n".encode() + b"0" for i in range(20000))  # GLOBAL then POP
    scan = reading._RecordScan(b"\x80\x02" + globals_ + b"N.")
    assert scan.load() is None and scan.records == {}
    assert scan.find_class("os", "system") is reading._Stub and scan.find_class("m1", "n1") is reading._Stub
    assert scan.find_class("torch", "HalfStorage").storage_name == "HalfStorage"
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.setattr(reading, "MAX_PICKLE_BYTES", 10)
    with pytest.raises(CheckpointError, match=r"data\.pkl declares \d+ bytes"):
        read_checkpoint(path)
