"""`--image PATH`: the input images of a run, read once, checked whole and fingerprinted before anything is written.

An input image is read as bytes once, hashed (SHA-256 of the file's whole content) and decoded from
those same bytes, so that what the run records is exactly what it encodes. It is refused, in one
line naming the file and the fix, when it is not a file PIL reads as an image, when it is truncated
(PIL's `load()` decodes every pixel), when it is a decompression bomb (more pixels than PIL's
`Image.MAX_IMAGE_PIXELS`: PIL's own limit, its warning taken as a refusal), or when its pixels have
more than 8 bits per channel (PIL's modes I, I;16, F: converting them to 8-bit RGB as
diffusers.utils.load_image does clips every value above 255, a white image). Every other mode
(palette, grey, CMYK, alpha) is converted as diffusers.utils.load_image converts it: EXIF
orientation applied, then `convert("RGB")` (an alpha channel is dropped), which is what the
pipelines' documentation feeds them. A `--mask` is read the same way (the inpainting pipelines' mask
processor then makes it grey and binary), but one with transparent pixels is refused: the pipelines
drop the alpha channel, so a mask painted as transparency (as some editors save it) would be read by
its colours alone, not as drawn.

A run records each input as one text (`saved_text`): `PATH WxH sha256:DIGEST` (its size in pixels, which
the plan reads on a resume that no longer has the file), so that the run's hash,
run.json, the PNGs and --report name the bytes that made the pixels; `find_saved` reads the file
again on a resume that still has to encode it and refuses one that changed, and a resume whose
images are encoded already (in the run folder) does not need the file at all.

This module reads files with PIL and imports no torch (the command line reads it first).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import SettingsError
from .safe_read import NotARegularFile, read_regular_file

SAVED_HASH = " sha256:"  # between the path and the digest in a saved text
# The largest input file read: PIL's default pixel limit (89.5 megapixels) as uncompressed 16-bit
# RGBA is 716 MB; no photograph a FLUX pipeline is given comes near, and it bounds what one option
# makes the tool hold in RAM.
MAX_IMAGE_FILE_BYTES = 768 * 2**20
# PIL modes whose channels hold more than 8 bits: convert("RGB") clips them to 255.
WIDE_MODES = ("I", "F")


@dataclass(frozen=True)
class InputImage:
    path: Path  # absolute
    sha256: str  # hex digest of the file's content
    image: object  # PIL.Image.Image, RGB, fully decoded

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, as PIL gives it."""
        return self.image.size

    @property
    def saved_text(self) -> str:
        """How run.json, the run's hash and the PNGs record it: `PATH WxH sha256:DIGEST`."""
        return saved_text(self.path, self.size, self.sha256)


def saved_text(path: Path, size: tuple[int, int], sha256: str) -> str:
    return f"{path} {size[0]}x{size[1]}{SAVED_HASH}{sha256}"


def read_image(text: str, option: str = "--image", mask: bool | None = None) -> InputImage:
    """An --image (or --mask) value, read once, hashed and decoded whole. Raises SettingsError naming
    the value (as `option` names it) and the fix. `mask`: read as a mask (decode's check); default:
    when `option` is --mask."""
    path = Path(text).expanduser().absolute()
    what = f"{option} '{text}'"
    if not text.strip():
        raise SettingsError(f"{option}: empty; give an image file, e.g. {option} photo.png")
    try:
        data = read_regular_file(path, MAX_IMAGE_FILE_BYTES)
    except FileNotFoundError:
        raise SettingsError(f"{what}: no such file; check the path") from None
    except IsADirectoryError:
        raise SettingsError(f"{what} is a folder; give an image file in it") from None
    except NotARegularFile:
        raise SettingsError(f"{what} is not a regular file (a pipe or a device); give an image file") from None
    except ValueError as error:
        raise SettingsError(f"{what} is {error}, more than any image a FLUX pipeline takes; give a smaller "
                            "image") from None
    except OSError as error:
        raise SettingsError(f"{what} cannot be read ({error.strerror or error}); check the file") from None
    return InputImage(path, hashlib.sha256(data).hexdigest(), decode(data, what, mask=option == "--mask" if mask is None else mask))


def decode(data: bytes, what: str, mask: bool = False):
    """The image in `data`, every pixel decoded, converted to RGB as diffusers.utils.load_image
    converts it; raises SettingsError (`what` names the value) for anything else, and for a `mask`
    with transparent pixels (the module's docstring says why)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL warns past MAX_IMAGE_PIXELS and raises past twice that: both are its bomb limit here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise SettingsError(f"{what} has more pixels than PIL decodes safely ({_first(error)}): a decompression "
                            "bomb, or an image far larger than a FLUX pipeline takes; give a smaller image") from None
    except UnidentifiedImageError:
        raise SettingsError(f"{what} is not an image PIL can read; give a PNG, JPEG or WebP file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # PIL's errors for damaged data
        raise SettingsError(f"{what} is damaged or truncated ({_first(error)}); fetch or save the image "
                            "again") from None
    if image.mode.split(";")[0] in WIDE_MODES:
        raise SettingsError(f"{what} has {image.mode} pixels (more than 8 bits per channel), which converting to "
                            "the pipelines' 8-bit RGB would clip; save it as an 8-bit RGB PNG or JPEG")
    if mask and (image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info) \
            and image.convert("RGBA").getchannel("A").getextrema()[0] < 255:
        raise SettingsError(f"{what} has transparent pixels, which the inpainting pipelines ignore (they read a "
                            "mask's grey levels: white is redrawn, black kept); save the mask as an opaque "
                            "black-and-white image")
    return ImageOps.exif_transpose(image).convert("RGB")


def _first(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def parse_saved(text: str) -> tuple[Path, tuple[int, int], str]:
    """A saved text (InputImage.saved_text) -> (path, (width, height), sha256); raises SettingsError if malformed."""
    head, found, digest = text.rpartition(SAVED_HASH)
    path, _, size_text = head.rpartition(" ")
    width, cross, height = size_text.partition("x")
    if not (found and path and Path(path).is_absolute() and cross and width.isascii() and width.isdigit() and height.isascii() and height.isdigit()
            and int(width) > 0 and int(height) > 0 and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)):
        raise SettingsError(f"--image: '{text}' is not PATH WxH sha256:DIGEST")
    return Path(path), (int(width), int(height)), digest


def canonical_saved(text: str) -> str:
    """A saved text as InputImage.saved_text writes it (the schema's check of run.json's entries)."""
    return saved_text(*parse_saved(text))


def find_saved(text: str, run_dir: Path | None = None, option: str = "--image") -> InputImage:
    """The input image (or `option` --mask: the mask) a run recorded, read again; raises
    SettingsError if it is gone or its content changed since (a resume must encode the bytes the run
    began with)."""
    path, _, digest = parse_saved(text)
    where = f"the run in {run_dir}" if run_dir else "the run"
    try:
        found = read_image(str(path), option)
    except SettingsError as error:
        raise SettingsError(f"--resume: {where} has not encoded its input images yet and needs {path} again, "
                            f"which cannot be used now ({str(error).split(': ', 1)[-1]}); restore it, or start a new "
                            "run") from None
    if found.sha256 != digest:
        what = "mask" if option == "--mask" else "input image"
        raise SettingsError(
            f"--resume: the {what} {path} changed since {where} began (SHA-256 {found.sha256[:12]}..., the "
            f"run's {digest[:12]}...); its images would mix both: restore that file, or start a new run with it")
    return found
