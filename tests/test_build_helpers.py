"""Unit tests of tools/cuda_build.py (toolkit, cuBLAS and arch discovery for the CUDA build, and the
extension's source list that setup.py and CMakeLists.txt share).

Nothing here compiles: the helpers are exercised on fake nvcc output and fake folder layouts,
plus a few read-only checks against this machine's toolkit and torch install when present.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_helpers():
    # Loaded from its path, exactly as setup.py does (it runs before vitkern is installed).
    name = "vitkern_cuda_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bh = _load_helpers()

DRYRUN_TEXT = """\
#$ _NVVM_BRANCH_=nvvm
#$ _SPACE_=\x20
#$ _CUDART_=cudart
#$ _HERE_=/opt/cuda-13.0/bin
#$ _THERE_=/opt/cuda-13.0/bin
#$ _TARGET_SIZE_=
#$ _TARGET_DIR_=targets/x86_64-linux
#$ TOP=/opt/cuda-13.0/bin/..
#$ CICC_PATH=/opt/cuda-13.0/bin/../nvvm/bin
#$ NVVMIR_LIBRARY_DIR=/opt/cuda-13.0/bin/../nvvm/libdevice
#$ gcc -D__CUDA_ARCH_LIST__=750 -E -x c++ -D__CUDACC__ "/dev/null"
"""


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _fake_toolkit(root: Path) -> Path:
    _touch(root / "bin" / "nvcc", "#!/bin/sh\n")
    _touch(root / "include" / "cuda_runtime_api.h", "#define CUDART_VERSION  13000\n")
    return root


# ------------------------------------------------------------------------------- TOP= parsing


def test_parse_top_from_dryrun_text():
    assert bh.parse_nvcc_dryrun_top(DRYRUN_TEXT) == "/opt/cuda-13.0/bin/.."


def test_parse_top_missing_or_quoted():
    assert bh.parse_nvcc_dryrun_top("") is None
    assert bh.parse_nvcc_dryrun_top("#$ _HERE_=/x/bin\n#$ CICC_PATH=/x/nvvm\n") is None
    assert bh.parse_nvcc_dryrun_top('#$ TOP="/opt/my cuda/bin/.."\n') == "/opt/my cuda/bin/.."
    # "_TOP=" or other keys ending in TOP are not the TOP line
    assert bh.parse_nvcc_dryrun_top("#$ NOTTOP=/wrong\n#$ TOP=/right\n") == "/right"


def test_dryrun_top_resolves_the_path(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    text = DRYRUN_TEXT.replace("/opt/cuda-13.0", str(toolkit))
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=text)

    assert bh.nvcc_dryrun_top("/usr/local/bin/nvcc", run=fake_run) == os.path.realpath(toolkit)
    assert calls[0][:2] == ["/usr/local/bin/nvcc", "--dryrun"]
    assert "-x" in calls[0] and "cu" in calls[0]


def test_dryrun_top_survives_a_broken_nvcc():
    def failing_run(cmd, **kwargs):
        raise OSError("exec format error")

    assert bh.nvcc_dryrun_top("/bad/nvcc", run=failing_run) is None


# ----------------------------------------------------------------------------- CUDA home


def test_cuda_home_explicit_env_wins(tmp_path):
    env = {"CUDA_HOME": str(tmp_path / "a"), "CUDA_PATH": str(tmp_path / "b")}
    home = bh.find_cuda_home(env=env, which=lambda _: pytest.fail("PATH must not be searched"))
    assert home.path == str(tmp_path / "a") and home.how == "$CUDA_HOME"
    home = bh.find_cuda_home(env={"CUDA_PATH": str(tmp_path / "b")}, which=lambda _: None)
    assert home.path == str(tmp_path / "b") and home.how == "$CUDA_PATH"


def test_cuda_home_through_a_wrapper_nvcc(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = _touch(tmp_path / "usr-local-bin" / "nvcc", f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    home = bh.find_cuda_home(
        env={},
        which=lambda name: str(wrapper),
        dryrun_top=lambda nvcc: str(toolkit) if nvcc == str(wrapper) else None,
        default_roots=(),
    )
    assert home.path == str(toolkit)
    assert home.nvcc == str(toolkit / "bin" / "nvcc")
    assert "TOP=" in home.how


def test_cuda_home_falls_back_to_resolved_nvcc(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda")
    link = tmp_path / "bin" / "nvcc"
    link.parent.mkdir()
    link.symlink_to(toolkit / "bin" / "nvcc")
    home = bh.find_cuda_home(env={}, which=lambda _: str(link), dryrun_top=lambda _: None, default_roots=())
    assert home.path == os.path.realpath(toolkit)


def test_cuda_home_not_found(tmp_path):
    home = bh.find_cuda_home(env={}, which=lambda _: None, default_roots=(str(tmp_path / "none"),))
    assert home.path is None and home.nvcc is None
    assert "CUDA_HOME" in home.how
    home = bh.find_cuda_home(env={}, which=lambda _: None, default_roots=(str(_fake_toolkit(tmp_path / "c")),))
    assert home.path == str(tmp_path / "c")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_cuda_home_on_this_machine():
    home = bh.find_cuda_home(env={})
    assert home.path is not None and home.nvcc is not None, home.how
    assert os.path.isfile(os.path.join(home.path, "include", "cuda_runtime_api.h"))
    assert bh.cuda_toolkit_version(home.path) is not None


def test_cuda_toolkit_version(tmp_path):
    assert bh.cuda_toolkit_version(str(_fake_toolkit(tmp_path / "cuda"))) == "13.0"
    assert bh.cuda_toolkit_version(str(tmp_path / "missing")) is None
    assert bh.cuda_major_of("12.8") == 12 and bh.cuda_major_of("13.0") == 13 and bh.cuda_major_of(None) is None


# ------------------------------------------------------------------------------- arch list


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, ["8.0+PTX", "9.0a"]),
        ("", ["8.0+PTX", "9.0a"]),
        ("8.0;9.0a", ["8.0", "9.0a"]),
        ("9.0a", ["9.0a"]),
        ("80 90a", ["8.0", "9.0a"]),
        ("sm_80, sm_90a", ["8.0", "9.0a"]),
        ("8.6+PTX;12.0a;10.0f", ["8.6+PTX", "12.0a", "10.0f"]),
        ("9.0+PTX;9.0a", ["9.0+PTX", "9.0a"]),
        ("100a", ["10.0a"]),
        ("8.0;8.0;80", ["8.0"]),
        (" 9.0A ", ["9.0a"]),
    ],
)
def test_parse_arch_list(text, expected):
    assert bh.parse_arch_list(text) == expected


@pytest.mark.parametrize("text", ["9", "sm90x", "ampere", "8.0;foo", "8.0-PTX", ";", "9.0a+PTX", "10.0f+PTX"])
def test_parse_arch_list_rejects(text):
    with pytest.raises(ValueError, match="arch"):
        bh.parse_arch_list(text)


def test_default_arch_list_is_what_design_asks():
    # sm_80 with its (generic) PTX, so newer GPUs (sm_100, sm_120) JIT the kernels; sm_90a code
    assert bh.DEFAULT_CUDA_ARCHS == "8.0+PTX;9.0a"
    archs = bh.parse_arch_list(None)
    assert any(a.endswith("+PTX") and a.split("+")[0][-1].isdigit() for a in archs)


def test_arch_specific_ptx_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"9\.0\+PTX or 8\.0\+PTX"):
        bh.parse_arch_list("8.0;9.0a+PTX")


@pytest.mark.parametrize(
    "toolkit, torch_cuda, ok",
    [("13.0", "13.0", True), ("13.1", "13.0", True), ("12.8", "13.0", False), ("13.0", "12.8", False),
     (None, "13.0", True), ("13.0", None, True)],
)
def test_cuda_mismatch(toolkit, torch_cuda, ok):
    reason = bh.cuda_mismatch(toolkit, torch_cuda)
    assert (reason is None) == ok
    if not ok:
        assert toolkit in reason and torch_cuda in reason and "CUDA_HOME" in reason


class _FailingBuild:
    """Stands in for torch's BuildExtension: run() fails as a broken .cu compile would."""

    def __init__(self, error, out_path=None):
        self.error = error
        self.extensions = [type("Ext", (), {"name": "vitkern._C"})()]
        self.out_path = out_path

    def get_ext_fullpath(self, name):
        return self.out_path

    def run(self):
        if self.error is not None:
            raise self.error


def test_guard_build_turns_a_failed_build_into_a_skip(tmp_path):
    stale = _touch(tmp_path / "_C.cpython-311-x86_64-linux-gnu.so", "old build")
    built = _touch(tmp_path / "build_C.so", "partial")
    messages = []
    guarded = bh.guard_build(_FailingBuild, force=False, log=messages.append, outputs=lambda: [str(stale)])
    guarded(
        RuntimeError("error: ninja: build stopped: subcommand failed.\n  dense_epilogue.cu(12): error"), str(built)
    ).run()
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "the build failed: RuntimeError" in messages[0] and "dense_epilogue.cu" in messages[0]
    assert "VITKERN_FORCE_CUDA_BUILD=1" in messages[0]
    assert not stale.exists() and not built.exists(), "a stale vitkern._C must not survive a failed build"
    # a SystemExit (distutils' way of failing) is a failed build too
    guarded(SystemExit("error: command '/usr/bin/nvcc' failed with exit code 1")).run()
    assert len(messages) == 2


def test_guard_build_forced_raises_and_success_is_silent(tmp_path):
    messages = []
    forced = bh.guard_build(_FailingBuild, force=True, log=messages.append)
    with pytest.raises(RuntimeError, match="boom"):
        forced(RuntimeError("boom")).run()
    keep = _touch(tmp_path / "_C.so", "fresh build")
    bh.guard_build(_FailingBuild, force=False, log=messages.append, outputs=lambda: [str(keep)])(None, str(keep)).run()
    assert messages == [] and keep.exists()


def test_arch_to_sm():
    assert bh.arch_to_sm("9.0a") == "sm_90a"
    assert bh.arch_to_sm("8.0+PTX") == "sm_80"
    assert bh.arch_to_sm("12.0") == "sm_120"


# -------------------------------------------------------------------------------- MAX_JOBS


@pytest.mark.parametrize(
    "cores, mem_gib, expected",
    [
        (2, 23, 2),  # this machine: cores bound
        (16, 128, 16),
        (16, 8, 2),  # memory bound: 4 GiB a job
        (8, 3, 1),  # at least one job
        (4, None, 4),  # unknown memory: cores
        (0, None, 1),
    ],
)
def test_compute_max_jobs(cores, mem_gib, expected):
    mem = None if mem_gib is None else mem_gib * bh.GIB
    assert bh.compute_max_jobs(cores, mem) == expected


def test_max_jobs_respects_env():
    assert bh.max_jobs({"MAX_JOBS": "7"}) == "7"
    assert int(bh.max_jobs({})) >= 1


def test_available_memory_reads_meminfo(tmp_path):
    meminfo = _touch(tmp_path / "meminfo", "MemTotal:       24576000 kB\nMemFree: 1 kB\nMemAvailable:   16777216 kB\n")
    assert bh.available_memory_bytes(str(meminfo)) == 16777216 * 1024
    meminfo = _touch(tmp_path / "meminfo2", "MemTotal:       8388608 kB\n")
    assert bh.available_memory_bytes(str(meminfo)) == 8 * bh.GIB
    assert bh.available_cores() >= 1


def test_env_flag():
    assert bh.env_flag({"X": "1"}, "X") and bh.env_flag({"X": "True"}, "X") and bh.env_flag({"X": "on"}, "X")
    assert not bh.env_flag({}, "X") and not bh.env_flag({"X": "0"}, "X") and not bh.env_flag({"X": ""}, "X")
    with pytest.raises(ValueError, match="X="):
        bh.env_flag({"X": "maybe"}, "X")


# ------------------------------------------------------------------------- cuBLAS and nvrtc


def _fake_wheel(site: Path, pkg: str, major: int, extra_versions=()) -> Path:
    root = site / "nvidia" / pkg
    _touch(root / "include" / "cublasLt.h")
    for name in ("cublasLt", "cublas", "nvrtc"):
        _touch(root / "lib" / f"lib{name}.so.{major}")
        for v in extra_versions:
            _touch(root / "lib" / f"lib{name}.so.{v}")
    return root


def test_versioned_library_prefers_the_soname(tmp_path):
    lib = tmp_path / "lib"
    for name in ("libcublasLt.so.13.1.0.3", "libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.13.bak"):
        _touch(lib / name)
    assert bh.versioned_library(str(lib), "cublasLt", 13) == str(lib / "libcublasLt.so.13")
    assert bh.versioned_library(str(lib), "cublasLt", 12) == str(lib / "libcublasLt.so.12")
    # no major given: fewest version parts, newest first
    assert bh.versioned_library(str(lib), "cublasLt") == str(lib / "libcublasLt.so.13")
    assert bh.versioned_library(str(lib), "cublas") is None
    _touch(lib / "libcublas.so")
    assert bh.versioned_library(str(lib), "cublas", 13) == str(lib / "libcublas.so")


def test_find_cublas_cuda13_wheel(tmp_path):
    site = tmp_path / "site-packages"
    root = _fake_wheel(site, "cu13", 13, extra_versions=("13.1.0.3",))
    _touch(site / "nvidia" / "cudnn" / "include" / "cudnn.h")  # unrelated package
    found = bh.find_cublas([str(site)], cuda_home=None, cuda_major=13)
    assert found is not None
    assert found.include_dir == str(root / "include")
    assert found.lib_dir == str(root / "lib")
    assert found.libraries == (str(root / "lib" / "libcublasLt.so.13"), str(root / "lib" / "libcublas.so.13"))
    assert found.source == "wheel nvidia/cu13"


def test_find_cublas_cuda12_wheel_layout(tmp_path):
    site = tmp_path / "site-packages"
    root = _fake_wheel(site, "cublas", 12)
    found = bh.find_cublas([str(site)], cuda_home=None, cuda_major=12)
    assert found is not None and found.libraries[0] == str(root / "lib" / "libcublasLt.so.12")


def test_find_cublas_prefers_torchs_cuda_major(tmp_path):
    site = tmp_path / "site-packages"
    _fake_wheel(site, "cu12", 12)
    root13 = _fake_wheel(site, "cu13", 13)
    found = bh.find_cublas([str(site)], cuda_home=None, cuda_major=13)
    assert found.include_dir == str(root13 / "include")


def test_find_cublas_falls_back_to_toolkit(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda")
    assert bh.find_cublas([str(tmp_path / "empty-site")], str(toolkit), 13) is None
    _touch(toolkit / "include" / "cublasLt.h")
    _touch(toolkit / "lib64" / "libcublasLt.so.13")
    _touch(toolkit / "lib64" / "libcublas.so.13")
    found = bh.find_cublas([str(tmp_path / "empty-site")], str(toolkit), 13)
    assert found is not None and found.source == "toolkit"
    assert found.libraries[1] == str(toolkit / "lib64" / "libcublas.so.13")


def test_find_cublas_needs_header_and_both_libraries(tmp_path):
    site = tmp_path / "site-packages"
    root = site / "nvidia" / "cu13"
    _touch(root / "include" / "cublasLt.h")
    _touch(root / "lib" / "libcublasLt.so.13")
    assert bh.find_cublas([str(site)], None, 13) is None  # libcublas missing


def test_find_nvrtc(tmp_path):
    site = tmp_path / "site-packages"
    root = _fake_wheel(site, "cu13", 13)
    found = bh.find_nvrtc([str(site)], None, 13)
    assert found is not None and found.libraries == (str(root / "lib" / "libnvrtc.so.13"),)
    assert bh.find_nvrtc([str(tmp_path / "none")], None, 13) is None


def test_find_cublas_in_this_torch_install():
    torch = pytest.importorskip("torch")
    if not torch.version.cuda:
        pytest.skip("torch is not a CUDA build")
    site = os.path.dirname(os.path.dirname(torch.__file__))
    if not os.path.isdir(os.path.join(site, "nvidia")):
        pytest.skip("torch was not installed with the NVIDIA wheels")
    found = bh.find_cublas([site], None, bh.cuda_major_of(torch.version.cuda))
    assert found is not None
    assert all(os.path.isfile(path) for path in found.libraries)
    assert os.path.basename(found.libraries[0]).startswith("libcublasLt.so.")


# -------------------------------------------------------------------------------- version


def test_read_version(tmp_path):
    assert bh.read_version(str(ROOT / "vitkern" / "_version.py")) == "0.1.0"
    path = _touch(tmp_path / "v.py", '"""doc"""\nOTHER = 1\n__version__ = "2.3.4.dev1"\n')
    assert bh.read_version(str(path)) == "2.3.4.dev1"
    with pytest.raises(ValueError, match="__version__"):
        bh.read_version(str(_touch(tmp_path / "none.py", "x = 1\n")))


def test_cli_archs_and_max_jobs():
    script = str(ROOT / "tools" / "cuda_build.py")
    out = subprocess.run([sys.executable, script, "archs", "80,90a"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "8.0;9.0a"
    out = subprocess.run([sys.executable, script, "archs", ""], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "8.0+PTX;9.0a"
    out = subprocess.run([sys.executable, script, "max-jobs"], capture_output=True, text=True, check=True)
    assert int(out.stdout) >= 1
    bad = subprocess.run([sys.executable, script, "nope"], capture_output=True, text=True)
    assert bad.returncode == 2


# -------------------------------------------------------------------------------- sources


def test_sources_are_every_extension_source_in_csrc():
    sources = bh.read_sources()
    assert len(sources) == len(set(sources))
    files = [p for p in (ROOT / "csrc").iterdir() if p.is_file()]
    assert sorted(sources) == sorted(p.relative_to(ROOT).as_posix() for p in files if p.suffix in (".cpp", ".cu"))
    # csrc/ holds the C++/CUDA sources and headers only.
    assert {p.suffix for p in files} <= {".cpp", ".cu", ".h", ".cuh"}


def test_read_sources_skips_comments_blank_and_indented_lines(tmp_path):
    path = _touch(tmp_path / "sources.txt", "# host\na.cpp\n\n  # note\n\tb.cpp\n   \nc.cu\n#d.cu\n")
    assert bh.read_sources(str(path)) == ["a.cpp", "c.cu"]
    with pytest.raises(ValueError, match="no source files"):
        bh.read_sources(str(_touch(tmp_path / "empty.txt", "# nothing\n\n")))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_reads_the_same_source_list(tmp_path):
    # The file(STRINGS) line of CMakeLists.txt, run by `cmake -P` on the real list.
    line = next(ln for ln in (ROOT / "CMakeLists.txt").read_text().splitlines() if ln.startswith("file(STRINGS"))
    script = _touch(
        tmp_path / "sources.cmake",
        f'set(VITKERN_SOURCES_FILE "{bh.SOURCES_FILE}")\n{line}\n'
        'foreach(s ${VITKERN_SOURCES})\n  message("${s}")\nendforeach()\n',
    )
    out = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, check=True)
    assert out.stderr.splitlines() == bh.read_sources()
