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
