"""Installed, it works from any folder: the wheel (configs inside), its console scripts, and the harness running
txt2img as a module. Built from a copy of the checkout, installed with --no-deps into a temporary target that
comes first on the path, run from an empty folder outside the checkout."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = ("ldm-txt2img", "ldm-img2img", "ldm-inpaint", "ldm-convert", "ldm-random-checkpoint", "ldm-benchmark")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(target folder, environment, empty working folder) of the wheel installed with --no-deps."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("ldm", "configs"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(base / "wheel"), str(src)],
                   check=True, cwd=base)
    wheel = next((base / "wheel").glob("ldm_fast-*.whl"))
    target = base / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True,
                   cwd=base)
    env = dict(os.environ, PYTHONPATH=str(target), XDG_CACHE_HOME=str(base / "cache"))
    work = base / "empty"
    work.mkdir()
    return target, env, work


def run(cmd, installed, timeout=600):
    target, env, work = installed
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


def test_ldm_is_imported_from_the_install_with_its_configs(installed):
    target = installed[0]
    code = "import ldm, ldm.model.presets as p; print(ldm.__file__); print(p.config_root())"
    out = run([sys.executable, "-c", code], installed)
    assert out.returncode == 0, out.stderr
    module, configs = out.stdout.split()
    assert module.startswith(str(target)) and not module.startswith(ROOT), module
    assert configs == os.path.join(str(target), "ldm", "configs")
    assert sorted(os.listdir(configs)) == ["sdxl", "stable-diffusion", "tiny"]
    for folder in ("sdxl", "stable-diffusion", "tiny"):
        assert sorted(f for f in os.listdir(os.path.join(configs, folder)) if f.endswith(".yaml")) == \
            sorted(os.listdir(os.path.join(ROOT, "configs", folder))), folder


def test_console_scripts_exist_and_answer_help(installed):
    target = installed[0]
    for name in SCRIPTS:
        out = run([str(target / "bin" / name), "--help"], installed)
        assert out.returncode == 0 and "usage:" in out.stdout, (name, out.stderr[-500:])


@pytest.mark.slow
def test_installed_txt2img_and_benchmark_run_from_an_empty_folder(installed):
    target, _, work = installed
    out = run([str(target / "bin" / "ldm-txt2img"), "--demo", "--prompt", "A photo", "--n_iter", "1",
               "--n_samples", "1"], installed)
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.listdir(work / "outputs" / "txt2img-samples" / "samples") == ["00000.png"]

    out = run([str(target / "bin" / "ldm-benchmark"), "--random", "tiny", "--device", "cpu", "--H", "64", "--W", "64",
               "--steps", "2", "--repeats", "1"], installed, timeout=1200)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
    report = (work / "outputs" / "benchmark" / "benchmark.md").read_text()
    assert "ldm-fast 0.1.0 (installed)" in report  # the version of the installed package, not a checkout's commit
    with open(work / "outputs" / "benchmark" / "benchmark-runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ok = {r["config"] for r in rows if r["status"] == "ok"}
    assert {"C", "D", "E", "P"} <= ok, rows  # txt2img ran as a module of the installed package (and diffusers)
