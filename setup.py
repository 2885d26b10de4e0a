"""Build script: packages `fastrl` and ships the Triton kernels as `fastrl.triton_kernels`.

The Triton sources live in the top-level `triton_kernels/` folder of the repository, but a top-level
module of that name would shadow OpenAI Triton's own `triton_kernels` package (which vLLM imports),
so they are installed under the fastrl-owned name `fastrl.triton_kernels`. The C++/CUDA extension in
`csrc/` is built here too once it has sources: with CUDA torch and nvcc as a CUDAExtension, else as
a C++ CPU extension; `FASTRL_SKIP_EXT=1` skips it.
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def packages() -> tuple[list[str], dict[str, str]]:
    found = ["fastrl"] + [
        "fastrl." + str(p.parent.relative_to(ROOT / "fastrl")).replace(os.sep, ".")
        for p in sorted((ROOT / "fastrl").rglob("__init__.py"))
        if p.parent != ROOT / "fastrl"
    ]
    package_dir = {"fastrl": "fastrl"}
    if (ROOT / "triton_kernels" / "__init__.py").exists():
        found.append("fastrl.triton_kernels")
        package_dir["fastrl.triton_kernels"] = "triton_kernels"
    return found, package_dir


def extensions() -> tuple[list, dict]:
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not sources or os.environ.get("FASTRL_SKIP_EXT") == "1":
        return [], {}
    from torch.utils import cpp_extension

    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    import torch

    if cuda_sources and torch.version.cuda and cpp_extension.CUDA_HOME:
        ext = cpp_extension.CUDAExtension(
            "fastrl._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-DFASTRL_WITH_CUDA"]},
            define_macros=[("FASTRL_WITH_CUDA", None)],
        )
    else:
        ext = cpp_extension.CppExtension("fastrl._C", sources, extra_compile_args=["-O3"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


pkgs, pkg_dir = packages()
ext_modules, cmdclass = extensions()
setup(packages=pkgs, package_dir=pkg_dir, ext_modules=ext_modules, cmdclass=cmdclass)
