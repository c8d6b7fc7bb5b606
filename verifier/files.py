"""Atomic file writes: the new content goes to a temporary file beside the target, which is then
renamed over it, so the target holds either its old content or the whole new one. An error names
the target, never the temporary file."""
from __future__ import annotations

import os
import tempfile


def _new_file_mode(path: str) -> int:
    """The mode the target keeps (when it exists) or would get from ``open`` (the umask)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomically(path, write) -> None:
    """``write(tmp)`` writes a file at the path ``tmp`` (in ``path``'s folder, with its suffix,
    so that a writer that picks a format by suffix picks the same one); then ``tmp`` replaces
    ``path``. An OSError is raised with ``path`` as its file name."""
    path = os.fspath(path)
    folder, base = os.path.split(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=f".{base}.",
                                   suffix=os.path.splitext(base)[1])
        os.close(fd)
        os.chmod(tmp, _new_file_mode(path))
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), path) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


# -- what a file holds, by its first bytes ---------------------------------------------------------

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
_VNNLIB_STARTS = (";", "(declare-const", "(assert", "(define")


def sniff_format(path) -> str:
    """What the file at ``path`` holds, read from its first bytes (its name can lie): "torch"
    (a ``torch.save`` file: a zip archive, or a pickle of the legacy format), "vnnlib" (VNN-LIB
    text, plain or gzipped), else "onnx" (left to the ONNX reader to confirm). A file that
    cannot be read is "onnx" too: the reader reports it."""
    import gzip
    try:
        with open(path, "rb") as f:
            head = f.read(512)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                head = f.read(512)
    except (OSError, EOFError):
        return "onnx"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03",
                                                                         b"\x04", b"\x05"):
        return "torch"
    text = head.decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    if text.startswith(_VNNLIB_STARTS):
        return "vnnlib"
    return "onnx"
