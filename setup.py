"""Build dgr_fast: the C++ CPU extension where a compiler is present, the CUDA extension where torch has CUDA.

Both extensions are optional: when one cannot be built the package still imports and the `torch` and
`reference` backends work (`dgr_fast.available_backends()` says why the others are missing).
Build against the installed torch: `pip install --no-build-isolation -e .`
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

# -fopenmp: ATen's at::parallel_for is OpenMP header code, so the extension's own flags decide whether it runs in
# parallel; the link resolves to the libgomp torch already loaded (same soname), so there is one OpenMP runtime.
CXX_FLAGS = ["-O3", "-g0", "-std=c++17", "-fopenmp"]


def _extensions():
    if os.environ.get("DGR_FAST_NO_EXTENSIONS") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # torch is needed to build; without it, a pure-Python install
        return [], {}
    exts = []
    if shutil.which(os.environ.get("CXX", "c++")):
        exts.append(
            CppExtension(
                "dgr_fast._C",
                sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/module.cpp"],
                extra_compile_args={"cxx": CXX_FLAGS},
                extra_link_args=["-fopenmp"],
                define_macros=[("DGR_FAST_MODULE_NAME", "_C")],
                optional=True,
            )
        )
    if torch.version.cuda and CUDA_HOME and os.environ.get("DGR_FAST_NO_CUDA") != "1":
        exts.append(
            CUDAExtension(
                "dgr_fast._C_cuda",
                sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp")) + ["csrc/module.cpp"],
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
                define_macros=[("DGR_FAST_MODULE_NAME", "_C_cuda")],
                optional=True,
            )
        )
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="dgr_fast",
    version="0.1.0",
    description="Fused kernels for multi-task learning: DGR penalty, AdaTask, task-based SAM and more",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dgr_fast", "dgr_fast.*"]),
    # py.typed: type checkers read the package's annotations (PEP 561); without it AdaTask is Any to them.
    package_data={"dgr_fast": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "numpy"],
        # `dgr-fast train`: multi-digits and the frozen-feature probe (scikit-learn), the plot, the progress bar,
        # the UTKFace loader (pillow)
        "demo": ["scikit-learn", "matplotlib", "tqdm", "pillow"],
        # AdaTask and MTLStep under Lightning's manual optimisation (tests/test_lightning.py holds the recipe)
        "lightning": ["lightning>=2.0"],
    },
    entry_points={"console_scripts": ["dgr-fast = dgr_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
