"""Compiled CPU kernels (pastiche/csrc/cpu_kernels.c), built once per machine, called with ctypes.

PyTorch's eager mode runs each element-wise op as its own pass over memory into a fresh tensor;
around the small matrices of a 135M model those passes cost a quarter of a CPU training step.
The C file does dropout, RMSNorm, the rotary embedding, the masked attention softmax,
SiLU-times-up and the output layer's cross-entropy each in one pass. It is built with the system C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) into pastiche's cache folder the first time a CPU run asks for it (about
a second), keyed by the source, the compiler and the CPU, and is loaded after torch so that it
shares torch's OpenMP threads. Without a compiler, with ``PASTICHE_KERNELS=0`` or inside
``turned_off()``, ``library()`` returns None and pastiche/fastpath.py runs its PyTorch versions.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib.resources import files
from pathlib import Path

from pastiche import paths

# -fassociative-math (with the two flags it needs) lets the compiler vectorize sums; none of these
# flags assume finite values, which the -inf of attention masks needs.
OPTIMIZE = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math"]
FLAG_SETS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])  # first that compiles
POINTER, I64, I32, U64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_uint64, ctypes.c_float
SIGNATURES = {  # name: (argument types, result type)
    "pst_dropout": ([POINTER, POINTER, I64, U64, I32, I32], None),
    "pst_rms_norm": ([POINTER, POINTER, POINTER, POINTER, I64, I64, F32, I32], None),
    "pst_rms_norm_backward": ([POINTER, POINTER, POINTER, POINTER, POINTER, I64, I64, I32], None),
    "pst_silu_mul": ([POINTER, POINTER, POINTER, I64, I32], None),
    "pst_silu_mul_backward": ([POINTER, POINTER, POINTER, POINTER, POINTER, I64, I32], None),
    "pst_rotary": ([POINTER, POINTER, POINTER, POINTER, I64, I64, I64, I64, I64, I64, F32, I32, I32], None),
    "pst_masked_softmax": ([POINTER, POINTER, POINTER, I64, I64, I64, I64, I64, I64, I64, I32], None),
    "pst_cross_entropy_grad": ([POINTER, POINTER, I64, I64, I32], ctypes.c_double),
}


def source() -> bytes:
    return files("pastiche").joinpath("csrc", "cpu_kernels.c").read_bytes()


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def cpu_identity() -> bytes:
    """What -march=native depends on: the CPU's model and feature flags where Linux tells them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({line for line in lines if line.startswith(("model name", "flags"))})).encode()
    except OSError:
        return (platform.machine() + platform.processor()).encode()


def build(code: bytes, cc: str, target: Path) -> bool:
    """Compile ``code`` into ``target`` with the first flag set that works; False if none does."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "cpu_kernels.c"
        src.write_bytes(code)
        for flags in FLAG_SETS:
            out = Path(tmp) / "lib.so"
            done = subprocess.run([cc, *OPTIMIZE, *flags, "-shared", "-fPIC", "-o", str(out), str(src)],
                                  check=False, capture_output=True)
            if done.returncode == 0:
                os.replace(out, target)  # atomic: a concurrent run sees no half-written library
                return True
    return False


_turned_off = 0


@contextlib.contextmanager
def turned_off():
    """Run the PyTorch versions inside this block (benchmarks and tests compare both in one process)."""
    global _turned_off
    _turned_off += 1
    try:
        yield
    finally:
        _turned_off -= 1


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None where they cannot be built or are turned off."""
    return None if _turned_off or os.environ.get("PASTICHE_KERNELS", "1") == "0" else load()


@functools.cache
def load() -> ctypes.CDLL | None:
    """Build (once per machine) and load the library; None where that fails."""
    cc = compiler()
    if cc is None:
        return None
    try:
        code = source()
        key = hashlib.sha256(code + cc.encode() + cpu_identity()).hexdigest()[:16]
        target = paths.home() / "kernels" / key / "libpastiche_cpu.so"
        if not target.exists():
            print(f"pastiche: compiling the CPU training kernels once into {target.parent} ({Path(cc).name})")
            if not build(code, cc, target):
                return None
        import torch  # noqa: F401  (torch's OpenMP runtime is loaded first, so ours is the same one)

        lib = ctypes.CDLL(str(target))
    except OSError:
        return None
    for name, (args, result) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib
