"""Packages for setuptools; the metadata lives in pyproject.toml.

The yamls stay in the checkout's top-level ``configs/`` (where users and the original's command lines expect
them) and are mapped into the wheel as ``ldm/configs``, where ``ldm.model.presets.config_file`` finds them.
"""
from setuptools import find_packages, setup

setup(
    # configs/tiny and configs/sdxl are valid package names and configs/stable-diffusion is not: all are listed as data
    packages=find_packages(include=["ldm", "ldm.*"]) + ["ldm.configs", "ldm.configs.tiny", "ldm.configs.sdxl"],
    package_dir={"ldm.configs": "configs"},
    package_data={"ldm.configs": ["stable-diffusion/*.yaml"], "ldm.configs.tiny": ["*.yaml"],
                  "ldm.configs.sdxl": ["*.yaml"]},
)
