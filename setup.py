"""Build script: packages `fastrl` and ships the Triton kernels as `fastrl.triton_kernels`.

The Triton sources live in the top-level `triton_kernels/` folder of the repository, but a top-level
module of that name would shadow OpenAI Triton's own `triton_kernels` package (which vLLM imports),
so they are installed under the fastrl-owned name `fastrl.triton_kernels`. The C++/CUDA extension in
`csrc/` is built here too once it has sources: with CUDA torch and nvcc as a CUDAExtension, else as
a C++ CPU extension; `FASTRL_BUILD_EXT=0` (or `FASTRL_SKIP_EXT=1`) skips it, and a failed
compile warns and leaves the torch fallback unless `FASTRL_BUILD_EXT=1`.
"""

import os
import sys
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
    if not sources:
        return [], {}
    if os.environ.get("FASTRL_SKIP_EXT") == "1" or os.environ.get("FASTRL_BUILD_EXT") == "0":
        print(
            "fastrl: not building the fastrl._C extension (FASTRL_SKIP_EXT=1 or FASTRL_BUILD_EXT=0)"
            ";"
            " fastrl.ops uses the torch reference for packing",
            file=sys.stderr,
        )
        return [], {}
    import torch
    from torch.utils import cpp_extension

    class BuildExtension(cpp_extension.BuildExtension):
        """A failed compile warns and leaves the torch fallback, unless FASTRL_BUILD_EXT=1."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:
                if os.environ.get("FASTRL_BUILD_EXT") == "1":
                    raise
                self.warn(f"fastrl._C was not built ({error}); fastrl.ops falls back to torch")

    headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h"))
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    if cuda_sources and torch.version.cuda and cpp_extension.CUDA_HOME:
        arches = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        ext = cpp_extension.CUDAExtension(
            "fastrl._C",
            sources + cuda_sources,
            depends=headers,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *arches]},
            define_macros=[("FASTRL_WITH_CUDA", None)],
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastrl._C", sources, depends=headers, extra_compile_args=["-O3"]
        )
    return [ext], {"build_ext": BuildExtension}


pkgs, pkg_dir = packages()
ext_modules, cmdclass = extensions()
setup(packages=pkgs, package_dir=pkg_dir, ext_modules=ext_modules, cmdclass=cmdclass)
