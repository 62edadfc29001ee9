"""Install ``ring_flash_attn`` (distribution ``ring-attention-xpu``).

The package is pure Python. The SYCL kernel for Intel GPUs (csrc/sycl) is built
only when ``BUILD_SYCL=1`` is set and a SYCL compiler (icpx) is found; a plain
install never needs a compiler.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def sycl_extensions():
    """The SYCL extension, when asked for with BUILD_SYCL=1; [] otherwise."""
    if os.environ.get("BUILD_SYCL", "0") != "1":
        return [], {}
    compiler = os.environ.get("CXX") or shutil.which("icpx")
    if not compiler or not shutil.which(compiler):
        sys.exit("BUILD_SYCL=1 but no SYCL compiler was found: install the Intel oneAPI DPC++/C++ compiler "
                 "and `source /opt/intel/oneapi/setvars.sh` (or set CXX to icpx).")
    from torch.utils.cpp_extension import BuildExtension, SyclExtension

    sources = sorted(glob.glob("csrc/sycl/*.cpp") + glob.glob("csrc/sycl/*.sycl"))
    ext = SyclExtension(
        "ring_flash_attn._sycl",
        sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "sycl": ["-O3", "-DRFA_INTEL_EXTENSIONS=1"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = sycl_extensions()

setup(
    name="ring-attention-xpu",
    version="0.1.0",
    description="Context-parallel (ring) attention for Intel GPUs, NVIDIA GPUs and CPUs; "
                "a drop-in for zhuzilin/ring-flash-attention",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ring_flash_attn", "ring_flash_attn.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.8", "pyyaml>=6", "tqdm>=4.66"],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "numpy"],
        "triton": ["triton>=3.2"],
        "hf": ["transformers>=4.56,<6"],
        "megatron": ["megatron-core>=0.15,<0.17"],
        "plot": ["matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["ring-attn=ring_flash_attn.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
