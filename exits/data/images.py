"""Reading image files as 8-bit RGB: the one function every stage decodes images with.

PIL's ``convert("RGB")`` clips 16-bit grey values (modes ``I;16*`` and ``I``) at 255, so a
16-bit PNG would come out all white and be trained on. Here 16-bit data is scaled to
8 bits (``round(v / 257)``, the same mapping OpenCV's ``IMREAD_COLOR`` and ImageMagick
use), and modes with no defined 8-bit meaning (32-bit float) are refused with a reason.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageReadError", "ImagePathError", "image_file", "read_rgb", "decode_check"]

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageReadError(ValueError):
    """An image file that cannot be decoded into 8-bit RGB (the message names the file).

    ``reason``: the validation reason code, ``corrupt_image`` or ``unsupported_image``."""

    def __init__(self, message: str, reason: str = "corrupt_image"):
        super().__init__(message)
        self.reason = reason


class ImagePathError(ValueError):
    """A ``file_name`` that leads outside the image folder (reason ``outside_image_dir``)."""

    reason = "outside_image_dir"


def image_file(image_dir: str | Path, file_name: str) -> Path:
    """The path of an image record's file, which must lie inside ``image_dir``.

    One rule for every stage (validation, crops, the image CRF, the report gallery, the
    spot-fix page, stage 2): ``file_name`` is relative to the image folder; a name with
    ``..`` that climbs out of it, an absolute path, or a symlink whose target is outside
    it is refused. Sub-folders (``train2017/x.jpg``) and symlinks within the folder are fine.
    The returned path is ``image_dir / file_name`` as given (not resolved), so file names
    in logs stay the user's.

    Raises:
        ImagePathError: the name leaves the image folder (message names it and where it leads).
    """
    root = Path(image_dir)
    name = str(file_name)
    if not name or "\0" in name or Path(name).is_absolute() or name.startswith(("/", "\\")):
        raise ImagePathError(f"file_name {name!r} is not a path inside the image folder {root}")
    path = root / name
    try:
        resolved = path.resolve()
        inside = resolved.is_relative_to(root.resolve())
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise ImagePathError(f"file_name {name!r} cannot be resolved inside {root}: {exc}") from exc
    if not inside:
        raise ImagePathError(f"file_name {name!r} leads outside the image folder {root} (to {resolved})")
    return path


def _to_rgb(im: Image.Image, path: Path) -> np.ndarray:
    if im.mode in _SIXTEEN_BIT:
        # 16-bit grey (mode "I" is how older Pillow opens 16-bit PNGs): scale, do not clip.
        grey = np.asarray(im, dtype=np.float64)
        grey = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise ImageReadError(f"{path}: 32-bit float image (mode F) has no 8-bit meaning; convert it to 8 or 16 bits",
                             "unsupported_image")
    return np.array(im.convert("RGB"), dtype=np.uint8)


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of the image at ``path``.

    Raises:
        ImageReadError: the file is not an image, is truncated or corrupt, or has a pixel
            format with no 8-bit meaning. ``FileNotFoundError`` for a missing file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return _to_rgb(im, path)
    except FileNotFoundError:
        raise
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc


def decode_check(path: str | Path) -> tuple[int, int]:
    """Decode the whole file (catches truncated JPEG/PNG data that ``verify`` lets through)
    and check its pixel format; returns its (width, height).

    Raises:
        ImageReadError: as :func:`read_rgb`.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            size = im.size
            im.load()
            if im.mode == "F":
                raise ImageReadError(f"{path}: 32-bit float image (mode F) has no 8-bit meaning; "
                                     "convert it to 8 or 16 bits", "unsupported_image")
            return size
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc
