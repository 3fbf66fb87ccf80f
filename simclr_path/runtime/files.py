"""Files: output images written atomically (a temporary file beside the target, then a rename), a
file's content digest (the identity of an encoder or a label file), torch files read safely (a
one-line reason when they cannot be), and run folders locked while a run writes."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import struct
import tempfile
import zipfile
import zlib

import cv2
import numpy as np
import torch

from simclr_path.errors import SimclrPathError, first_line


def write_png(path: str, image: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Write a uint8 image, (H, W) one channel or (H, W, 3) RGB, as a PNG at ``path`` atomically;
    ``text`` goes into ``tEXt`` chunks (what a mask's values mean, read back by Pillow's ``info``)."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise SimclrPathError(f"{path}: the PNG could not be encoded (image {image.shape}); too large for PNG? "
                              "use a larger --downsample")
    encoded = _with_text(encoded.tobytes(), text or {})
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(encoded)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise SimclrPathError(f"{path}: cannot write the PNG ({exc.strerror or exc}); choose a folder you can write")\
            from None


def _with_text(png: bytes, text: dict[str, str]) -> bytes:
    """``png`` with a ``tEXt`` chunk per item inserted after its header chunk (IHDR, always first)."""
    header_end = 8 + 4 + 4 + 13 + 4  # signature, then IHDR's length, type, 13 data bytes, CRC
    chunks = b""
    for key, value in text.items():
        data = key.encode("latin-1") + b"\0" + value.encode("latin-1")
        chunks += struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:header_end] + chunks + png[header_end:]


def file_sha256(path: str, block: int = 1 << 22) -> str:
    """sha256 of a file's bytes (an encoder's identity: any re-export or retraining changes it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def load_torch_file(path: str, what: str, fix: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)``; a file that cannot be read is a one-line
    :class:`SimclrPathError`: ``<path>: not a readable <what> (<why>); <fix>``.

    The why names what is wrong with the file (see :func:`unreadable_reason`), never PyTorch's
    paragraph on ``weights_only``.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise SimclrPathError(f"{path}: no such file; {fix}") from None
    except IsADirectoryError:
        raise SimclrPathError(f"{path}: is a folder, not a file; {fix}") from None
    except Exception as exc:
        raise SimclrPathError(f"{path}: not a readable {what} ({unreadable_reason(path, exc)}); {fix}") from None


def unreadable_reason(path: str, exc: BaseException) -> str:
    """Why ``torch.load`` failed on ``path``, in a few words: empty, text, not a torch file, objects a
    safe load refuses, or damaged (with the first line of ``exc``)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as err:
        return err.strerror or first_line(err)
    if size == 0:
        return "the file is empty, 0 bytes: a copy or a write that did not finish"
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and _is_text(head):
        return f"a text file of {size} bytes, not a PyTorch file"
    message = str(exc)
    if "weights only load failed" in message.lower() and "unsupported operand" not in message.lower():
        found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        return ("it holds Python objects a safe load (weights_only) refuses"
                + (f", such as {found.group(1)}" if found else "") + "; simclr-path did not write it")
    if not is_zip and head.startswith(b"PK\x03\x04"):
        return f"truncated: a PyTorch zip archive cut short at {size} bytes"
    if not is_zip:
        return f"not a PyTorch file, {size} bytes: not the zip archive torch.save writes"
    return f"damaged or truncated, {size} bytes: {first_line(exc, 120)}"


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the sample
            return False
    return b"\0" not in head


#: The file a run holds an exclusive ``flock`` on while it writes its folder.
RUN_LOCK = ".lock"


@contextlib.contextmanager
def locked_run_folder(out: str, command: str):
    """Create the run folder ``out`` if needed and hold its lock until the block ends; a second run
    into the same folder (which would interleave ``metrics.jsonl`` and race on the checkpoint) is
    refused with one line.

    The lock is ``flock`` on ``out/.lock``: the kernel drops it when the process ends however it ends,
    so a killed run never leaves a stale lock. A folder this call created is removed again when the
    block fails before anything but the lock was written (a refused run leaves nothing behind).
    """
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        fh = open(os.path.join(out, RUN_LOCK), "a")
    except OSError as exc:
        raise SimclrPathError(f"{out}: run folder cannot be created ({exc.strerror}); choose another --out") from None
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SimclrPathError(
                f"{out}: another '{command}' is running in this folder (it holds {RUN_LOCK}); wait for it to "
                "finish or choose another --out"
            ) from None
        except OSError:
            pass  # a file system without flock: run unlocked, as before
        try:
            yield
        except BaseException:
            if created and os.listdir(out) == [RUN_LOCK]:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(out, RUN_LOCK))
                    os.rmdir(out)
            raise
    finally:
        fh.close()
