"""Reading a ``.zip`` of images safely: in memory (nothing is extracted), every member's path checked to
stay inside the archive, and a damaged archive or member reported in one line naming it."""
from __future__ import annotations

import zipfile
from contextlib import contextmanager
from pathlib import Path

from utils.errors import UserError


def zip_damaged(location: Path, e: Exception, member: str | None = None) -> UserError:
    what = f"{member} in {location}" if member else str(location)
    return UserError(f"cannot read {what} ({type(e).__name__}: {e}); the .zip is damaged (or uses a compression or "
                     f"encryption Python cannot read): copy or create the .zip again")


@contextmanager
def open_zip(location: Path):
    """``(names, read)``: the archive's file names and ``read(name) -> bytes``, valid inside the block.
    A member whose path leaves the archive's folder (``../x``, ``/x``) refuses the whole archive: no
    image tree has one, so it is a crafted or broken file."""
    try:
        zf = zipfile.ZipFile(location)
    except Exception as e:  # noqa: BLE001 - BadZipFile, NotImplementedError, OSError: all a damaged archive
        raise zip_damaged(location, e) from None
    with zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        for name in names:
            if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
                raise UserError(f"{location} holds the member {name!r}, whose path leaves the archive's folder; an "
                                f"image .zip has none: create the .zip again from the image folders")

        def read(name: str) -> bytes:
            try:
                return zf.read(name)
            except Exception as e:  # noqa: BLE001 - BadZipFile (CRC, header), zlib.error, NotImplementedError, ...
                raise zip_damaged(location, e, name) from None
        yield names, read
