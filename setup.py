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
    """The SYCL extension ``ring_flash_attn._sycl`` when BUILD_SYCL=1 (docs/sycl.md); nothing otherwise.

    Needs icpx on PATH (oneAPI DPC++/C++) and a PyTorch built with XPU support, and
    is meant for ``pip install --no-build-isolation`` so that this torch is the one
    the extension is built against. Architectures come from TORCH_XPU_ARCH_LIST
    (e.g. ``pvc,bmg``), which torch's SyclExtension reads itself; without it torch
    compiles for the architectures its own wheel targets.
    """
    if os.environ.get("BUILD_SYCL", "0") != "1":
        return [], {}
    if shutil.which("icpx") is None:
        sys.exit("BUILD_SYCL=1 but the SYCL compiler icpx is not on PATH: install the Intel oneAPI DPC++/C++ "
                 "compiler and `source /opt/intel/oneapi/setvars.sh` (docs/sycl.md).")
    try:
        import torch
    except ImportError:
        sys.exit("BUILD_SYCL=1 needs torch importable at build time: `pip install --no-build-isolation .`")
    if not torch.xpu._is_compiled():
        sys.exit(f"BUILD_SYCL=1 but torch {torch.__version__} was built without XPU support; install an XPU "
                 "build of torch (https://pytorch.org/get-started/locally/, 'XPU').")
    from torch.utils.cpp_extension import BuildExtension, SyclExtension

    defines = ["-DRFA_INTEL_EXTENSIONS=1"]
    if os.environ.get("RFA_JOINT_MATRIX", "0") == "1":  # XMX scores in the forward; never compiled yet
        defines.append("-DRFA_JOINT_MATRIX=1")
    arch = os.environ.get("TORCH_XPU_ARCH_LIST") or "torch's default (" + ",".join(torch.xpu.get_arch_list()) + ")"
    print(f"ring_flash_attn: building the SYCL kernels with icpx for {arch}; {' '.join(defines)}")
    ext = SyclExtension(
        "ring_flash_attn._sycl",
        sorted(glob.glob("csrc/sycl/*.cpp") + glob.glob("csrc/sycl/*.sycl")),  # ops.cpp, flash_attn.sycl
        extra_compile_args={"cxx": ["-O3", *defines], "sycl": ["-O3", *defines]},
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
    # The example run configs of configs/ ship inside the package as ring_flash_attn/configs/*.yaml, so that
    # `ring-attn train --config cpu_demo.yaml` finds them wherever the package is installed.
    packages=find_packages(include=["ring_flash_attn", "ring_flash_attn.*"]) + ["ring_flash_attn.configs"],
    package_dir={"ring_flash_attn.configs": "configs"},
    package_data={"ring_flash_attn.configs": ["*.yaml"]},
    python_requires=">=3.10",
    # numpy: torch's object collectives (all_gather_object) and tensor.numpy() need it, and torch does not
    # require it; packaging: the integrations' version gates.
    install_requires=["torch>=2.8", "numpy", "packaging", "pyyaml>=6", "tqdm>=4.66"],
    extras_require={
        # Everything the whole test suite needs on a CPU machine, pinned so CI is reproducible: the
        # Triton kernels run interpreted (TRITON_INTERPRET=1), which needs triton==3.7.1 (the 3.5/3.6
        # interpreter breaks with numpy >= 2.4, triton-lang/triton#9171; its bfloat16 dots are wrong in
        # 3.7.1 too, so the kernels upcast them when interpreted); the integration tests run the newest
        # transformers and megatron-core of the supported ranges below.
        "test": ["pytest>=8", "hypothesis>=6", "numpy", "triton==3.7.1", "transformers==5.24.0",
                 "megatron-core==0.16.1", "matplotlib>=3.8", "ninja", "datasets==5.2.0", "pyarrow==26.0.1"],
        # 3.6.0 ran the kernels on H100 (benchmarks/RESULTS.md).
        "triton": ["triton>=3.6"],
        "hf": ["transformers>=4.56,<6"],
        "megatron": ["megatron-core>=0.15,<0.17"],
        "plot": ["matplotlib>=3.8"],
        # What `ring-attn train` uses beyond the core: models and tokenizers, the loss plot.
        "train": ["transformers>=4.56,<6", "matplotlib>=3.8"],
        # Corpus formats of ring-attn train beyond text and jsonl: parquet files, `datasets` saved to disk.
        "data": ["datasets>=2.19", "pyarrow>=14"],
    },
    entry_points={"console_scripts": ["ring-attn=ring_flash_attn.cli:run"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
