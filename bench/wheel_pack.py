"""Pack a folder of wheels into one .tar.xz small enough to carry, and rebuild the wheels from it.

Wheels are zip files (deflate); the public trainer's requirements come to ~78 MiB that way,
pyarrow alone 53 MiB, over the 64 MiB a device run carries. Stored as their extracted files
in one xz archive they take ~60 MiB; `unpack` zips each one back into a wheel that pip
installs as usual (the files, and so the wheel's RECORD hashes, are unchanged).

    python bench/wheel_pack.py pack bench/public-wheels bench/public-wheels.tar.xz
    python bench/wheel_pack.py unpack bench/public-wheels.tar.xz /tmp/wheels
"""

from __future__ import annotations

import argparse
import io
import lzma
import os
import tarfile
import zipfile
from pathlib import Path


def pack(wheels: Path, archive: Path) -> int:
    """Every `*.whl` in `wheels`, extracted under a folder named after it, into `archive` (xz)."""
    with tarfile.open(archive, "w:xz", preset=6) as tar:
        for whl in sorted(Path(wheels).glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                for info in z.infolist():
                    if info.is_dir():
                        continue
                    data = z.read(info)
                    member = tarfile.TarInfo(f"{whl.name}/{info.filename}")
                    member.size = len(data)
                    member.mode = 0o644
                    tar.addfile(member, io.BytesIO(data))
    return archive.stat().st_size


def unpack(archive: Path, dest: Path) -> list[Path]:
    """Rebuild the wheels `pack` stored, in `dest`; returns their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    zips: dict[str, zipfile.ZipFile] = {}
    try:
        with tarfile.open(archive, "r:xz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                wheel, _, inner = member.name.partition("/")
                if not wheel.endswith(".whl") or "/" in wheel or not inner or ".." in Path(inner).parts:
                    raise ValueError(f"{archive}: unexpected member {member.name!r}")
                if wheel not in zips:
                    zips[wheel] = zipfile.ZipFile(dest / wheel, "w", compression=zipfile.ZIP_DEFLATED)
                zips[wheel].writestr(inner, tar.extractfile(member).read())
    finally:
        for z in zips.values():
            z.close()
    return sorted(dest / w for w in zips)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["pack", "unpack"])
    ap.add_argument("src")
    ap.add_argument("dst")
    a = ap.parse_args(argv)
    if a.action == "pack":
        size = pack(Path(a.src), Path(a.dst))
        print(f"{a.dst}: {size / 2**20:.1f} MiB")
    else:
        out = unpack(Path(a.src), Path(a.dst))
        print(f"{len(out)} wheels in {a.dst}")


if __name__ == "__main__":
    os.umask(0o022)
    main()
