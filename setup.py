"""Packaging for vitkern, with the optional CUDA extension vitkern._C.

Install with ``pip install -e . --no-build-isolation`` (an isolated build would fetch a second
torch to build against). The Python package always installs. The extension (sources in csrc/,
listed in tools/extension_sources.txt; toolkit discovery in tools/cuda_build.py) is built with
ninja when torch is a CUDA build and nvcc is found; otherwise it is skipped with a message, and
vitkern runs without it.

Environment switches:
  VITKERN_SKIP_CUDA_BUILD=1   never build the extension
  VITKERN_FORCE_CUDA_BUILD=1  fail the install instead of skipping the extension (without it, any
                              failure, including a compile error, skips the extension with a
                              one-line reason and the package still installs)
  VITKERN_CUDA_ARCHS          archs to compile for, default "8.0+PTX;9.0a" (passed on as
                              TORCH_CUDA_ARCH_LIST, so no GPU is needed to build)
  MAX_JOBS                    parallel compile jobs (default: min(cores, memory GiB // 4))
  CUDA_HOME / CUDA_PATH       the CUDA toolkit root (default: found from `nvcc --dryrun`)
"""

import importlib.util
import os
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_helpers():
    # By path: the build runs before vitkern is installed, and tools/ is not a package.
    path = os.path.join(ROOT, "tools", "cuda_build.py")
    spec = importlib.util.spec_from_file_location("vitkern_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


helpers = _load_build_helpers()


def _log(message):
    print(f"vitkern setup: {message}", file=sys.stderr, flush=True)


class _SkipExtension(Exception):
    """The extension cannot be built here; the reason is the message."""


def _ensure_ninja_on_path():
    """torch looks for `ninja` on PATH; the ninja wheel's binary is not there unless the venv is active."""
    import shutil

    if shutil.which("ninja"):
        return True
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja

        candidates.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for directory in candidates:
        if os.path.isfile(os.path.join(directory, "ninja")):
            os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
            return True
    return False


def _cuda_extension(force):
    """The CUDAExtension and BuildExtension for vitkern._C, or raise _SkipExtension(reason)."""
    try:
        import torch
    except ImportError as exc:
        raise _SkipExtension(f"torch is not importable ({exc}); install torch first and use --no-build-isolation")
    if not torch.version.cuda:
        raise _SkipExtension(f"torch {torch.__version__} is not a CUDA build")

    home = helpers.find_cuda_home()
    if not home.path:
        raise _SkipExtension(home.how)
    if not home.nvcc:
        raise _SkipExtension(f"no bin/nvcc under the CUDA toolkit root {home.path} ({home.how})")
    # torch.utils.cpp_extension computes CUDA_HOME when first imported: set it first, and patch
    # the module too in case something imported it already.
    os.environ["CUDA_HOME"] = home.path
    try:
        archs = helpers.parse_arch_list(os.environ.get("VITKERN_CUDA_ARCHS"))
    except ValueError as exc:
        raise ValueError(f"VITKERN_CUDA_ARCHS: {exc}") from None
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    os.environ["MAX_JOBS"] = helpers.max_jobs()
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.CUDA_HOME = home.path

    cuda_major = helpers.cuda_major_of(torch.version.cuda)
    site_dirs = [os.path.dirname(os.path.dirname(torch.__file__))]
    try:
        site_dirs += site.getsitepackages()
    except AttributeError:  # some virtualenv builds lack it
        pass
    cublas = helpers.find_cublas(site_dirs, home.path, cuda_major)
    if cublas is None:
        raise _SkipExtension(
            "cuBLASLt not found: no cublasLt.h + libcublasLt.so in site-packages/nvidia/*/ "
            f"(the NVIDIA wheels torch uses) or in {home.path}"
        )
    has_ninja = _ensure_ninja_on_path()
    if not has_ninja:
        _log("warning: ninja not found (pip install ninja); torch falls back to a slow serial build")

    toolkit_version = helpers.cuda_toolkit_version(home.path)
    mismatch = helpers.cuda_mismatch(toolkit_version, torch.version.cuda)
    if mismatch:
        raise _SkipExtension(f"{mismatch} ({home.how})")
    _log(
        f"building vitkern._C: CUDA {toolkit_version} at {home.path} ({home.how}); torch "
        f"{torch.__version__} (CUDA {torch.version.cuda}); TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}; "
        f"MAX_JOBS={os.environ['MAX_JOBS']}; cuBLASLt from {cublas.source}: {', '.join(cublas.libraries)}"
    )

    sources = helpers.read_sources()
    # The toolkit's own include dir goes before the wheel's (which also carries CUDA runtime
    # headers); cpp_extension appends the toolkit dir again, a harmless duplicate.
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(home.path, "include"), cublas.include_dir]
    # Archs are passed as "8.0,9.0a": only shell-safe characters, since torch's ninja file does not
    # quote the C++ flags. Never pass nvcc a flag containing "arch": torch then drops its own
    # -gencode flags.
    cxx_flags = [
        "-O3",
        f"-DVITKERN_BUILD_ARCHS={','.join(archs)}",
        "-DVITKERN_BUILD_SYSTEM=setuptools",
    ]
    nvcc_flags = ["-O3", "-lineinfo"]
    extension = cpp_extension.CUDAExtension(
        name="vitkern._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        # The versioned files by full path (there is no unversioned libcublasLt.so in the wheel),
        # and an rpath to them; torch has usually loaded these very libraries already.
        extra_link_args=[*cublas.libraries, f"-Wl,-rpath,{cublas.lib_dir}"],
    )
    build_ext = helpers.guard_build(
        cpp_extension.BuildExtension.with_options(use_ninja=has_ninja), force, _log, _in_tree_modules
    )
    return extension, build_ext


def _in_tree_modules():
    """The vitkern/_C module an earlier (editable) build left for this interpreter (other Pythons'
    builds, with other suffixes, are theirs to keep)."""
    import sysconfig

    return [os.path.join(ROOT, "vitkern", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))]


def _extensions():
    env = os.environ
    try:
        skip = helpers.env_flag(env, "VITKERN_SKIP_CUDA_BUILD")
        force = helpers.env_flag(env, "VITKERN_FORCE_CUDA_BUILD")
    except ValueError as exc:
        raise SystemExit(f"vitkern setup: {exc}")
    if skip:
        _log("VITKERN_SKIP_CUDA_BUILD is set: not building the CUDA extension vitkern._C")
        return [], {}
    try:
        extension, build_ext = _cuda_extension(force)
    except ValueError as exc:  # a malformed setting, e.g. VITKERN_CUDA_ARCHS: always an error
        raise SystemExit(f"vitkern setup: {exc}")
    except _SkipExtension as exc:
        if force:
            raise SystemExit(
                f"vitkern setup: VITKERN_FORCE_CUDA_BUILD is set but the CUDA extension cannot be built: {exc}"
            )
        _log(
            f"not building the CUDA extension vitkern._C: {exc} (set VITKERN_FORCE_CUDA_BUILD=1 to make this an error)"
        )
        return [], {}
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    version=helpers.read_version(os.path.join(ROOT, "vitkern", "_version.py")),
    packages=find_packages(include=["vitkern", "vitkern.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
