"""The native kernel cache loads only libraries it built itself, from folders nobody else can write to.

Each check runs in a fresh interpreter (the loader decides once per process) with its own cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ota_trainer.backends import native

pytestmark = pytest.mark.skipif(os.name != "posix" or native._compiler() is None, reason="needs POSIX and a C compiler")

PROBE = """
import json
from ota_trainer.backends import native
try:
    ok = native.available()
except native.NativeUnavailable as e:
    ok = "NativeUnavailable: " + str(e)
print(json.dumps({"available": ok, "why": native.why_unavailable()}))
"""


def _probe(cache: Path, mode: str = "auto") -> tuple[dict, str]:
    """(``available()`` and ``why_unavailable()`` in a fresh interpreter, its stderr)."""
    env = {**os.environ, "OTA_TRAINER_CACHE": str(cache), "OTA_TRAINER_NATIVE": mode}
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def _library(cache: Path) -> Path:
    (lib,) = (cache / "kernels").glob("ota_kernels-*.so")
    return lib


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A cache the loader built (copied by :func:`cache`, so most tests need not compile)."""
    cache = tmp_path_factory.mktemp("built") / "c"
    got, err = _probe(cache)
    assert got["available"] is True, got
    return cache


@pytest.fixture
def cache(built, tmp_path) -> Path:
    shutil.copytree(built, tmp_path / "c", symlinks=True)  # modes kept
    return tmp_path / "c"


def _assert_refused(cache: Path, err: str, why: dict, *words: str) -> None:
    assert why["available"] is False
    for w in words:
        assert w in why["why"], why["why"]
    assert "native merge kernels unavailable" in err and "using the PyTorch path" in err and why["why"] in err
    strict, _ = _probe(cache, mode="1")
    assert strict["available"].startswith("NativeUnavailable:") and words[0] in strict["available"]


def test_a_fresh_cache_is_owner_only_and_records_the_library_checksum(tmp_path):
    cache = tmp_path / "c"
    got, _ = _probe(cache)
    assert got == {"available": True, "why": None}
    kernels = cache / "kernels"
    assert (cache.stat().st_mode & 0o777, kernels.stat().st_mode & 0o777) == (0o700, 0o700)
    lib = _library(cache)
    assert lib.stat().st_mode & 0o077 == 0
    assert lib.with_name(lib.name + ".sha256").read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()
    assert sorted(p.name for p in kernels.iterdir()) == sorted(
        [".lock", lib.name, lib.name + ".sha256"]
    )  # no temp files
    built_at = lib.stat().st_mtime_ns
    assert _probe(cache)[0]["available"] is True  # loaded from the cache, not rebuilt
    assert lib.stat().st_mtime_ns == built_at


def test_an_existing_cache_root_keeps_its_permissions(tmp_path):
    root = tmp_path / "shared"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    assert _probe(root)[0]["available"] is True
    assert (root.stat().st_mode & 0o777, (root / "kernels").stat().st_mode & 0o777) == (0o755, 0o700)


@pytest.mark.parametrize("checksum", ["kept", "deleted"])
def test_a_planted_library_is_not_loaded(cache, tmp_path, checksum):
    marker = tmp_path / "planted-code-ran"
    src = tmp_path / "evil.c"
    src.write_text(
        "#include <stdio.h>\n__attribute__((constructor)) static void run(void) {"
        f' FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'
    )
    evil = tmp_path / "evil.so"
    subprocess.run([native._compiler(), "-shared", "-fPIC", "-o", str(evil), str(src)], check=True)
    lib = _library(cache)
    shutil.copyfile(evil, lib)  # the predictable name, our own mode bits: only the bytes differ
    if checksum == "deleted":
        lib.with_name(lib.name + ".sha256").unlink()
    got, err = _probe(cache)
    _assert_refused(cache, err, got, str(lib), "delete")
    assert not marker.exists()
    assert lib.read_bytes() == evil.read_bytes()  # refused, not rebuilt over
    # the control: loading it does run its code
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(lib)!r})"], check=True)
    assert marker.exists()


@pytest.mark.parametrize("folder", ["kernels", "root"])
def test_a_cache_others_can_write_to_is_refused(cache, folder):
    path = cache / "kernels" if folder == "kernels" else cache
    path.chmod(0o777)
    got, err = _probe(cache)
    _assert_refused(cache, err, got, f"refusing the kernel cache {path}", "other users can write", "chmod")


def test_a_sticky_cache_root_is_accepted_but_not_a_sticky_kernels_folder(cache):
    cache.chmod(0o1777)  # like /tmp
    assert _probe(cache)[0]["available"] is True
    (cache / "kernels").chmod(0o1777)
    got, err = _probe(cache)
    _assert_refused(cache, err, got, f"refusing the kernel cache {cache / 'kernels'}", "other users can write")


def test_a_symlinked_kernels_folder_is_refused(cache, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (cache / "kernels").rename(elsewhere)  # a private folder with a good library and checksum
    (cache / "kernels").symlink_to(elsewhere)
    got, err = _probe(cache)
    _assert_refused(cache, err, got, f"refusing the kernel cache {cache / 'kernels'}", "symbolic link")


@pytest.mark.parametrize("problem", ["writable", "symlink", "other user"])
def test_a_library_file_not_ours_alone_is_refused(cache, tmp_path, problem):
    lib = _library(cache)
    if problem == "writable":
        lib.chmod(0o666)
    elif problem == "symlink":
        real = tmp_path / "real.so"
        lib.rename(real)
        lib.symlink_to(real)
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a file away needs root")
        os.chown(lib, 65534, 65534)
    got, err = _probe(cache)
    _assert_refused(
        cache,
        err,
        got,
        f"refusing the kernel library file {lib}",
        {"writable": "writable by other users", "symlink": "symbolic link", "other user": "uid 65534"}[problem],
    )
