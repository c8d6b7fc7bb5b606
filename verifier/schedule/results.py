"""The results CSV of ``verifier batch`` as a resumable log: one row per finished instance,
appended and flushed to disk (fsync) as soon as the instance finishes, so an interrupted run
loses at most the instances that were still running. A rerun reads the rows already there and
runs only the instances without one. A row is keyed by its onnx and vnnlib paths, made absolute
from the current folder (the file stores them relative to it: rerun from the same folder).
"""
from __future__ import annotations

import csv
import os

from ..files import write_atomically
from .base import SchedulerError

HEADER = ["onnx", "vnnlib", "status", "time_s", "method", "reason"]
STATUSES = ("sat", "unsat", "unknown", "timeout", "error")


def key(onnx_path: str, vnnlib_path: str) -> tuple[str, str]:
    return (os.path.normpath(os.path.abspath(onnx_path)),
            os.path.normpath(os.path.abspath(vnnlib_path)))


class ResultsFile:
    """``rows``: the finished rows already in the file (dicts of text), in file order;
    ``append(row)`` writes one more and forces it to disk."""

    def __init__(self, path: str, retry_errors: bool = False):
        self.path = path
        self.rows: list[dict] = []
        self.dropped_errors = 0
        if os.path.exists(path) and os.path.getsize(path) > 0:
            self._read(retry_errors)
        else:
            self._rewrite([])
        self._f = open(path, "a", newline="")
        self._w = csv.writer(self._f)

    def _read(self, retry_errors: bool) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]  # a row cut by a kill has no newline: dropped
        lines = complete.decode("utf-8", errors="replace").splitlines()
        reader = csv.reader(lines)
        head = next(reader, None)
        if head != HEADER:
            raise SchedulerError(
                f"{self.path}: exists but is not a results file of 'verifier batch' (its header "
                f"is {','.join(head or [])!r}, expected {','.join(HEADER)!r}); give another --out "
                "or remove it")
        rows = []
        for i, r in enumerate(reader, 2):
            if len(r) != len(HEADER) or r[2] not in STATUSES:
                raise SchedulerError(f"{self.path}:{i}: not a result row ({','.join(r)!r}); "
                                     "fix or remove that line to resume")
            rows.append(dict(zip(HEADER, r)))
        if retry_errors:
            self.dropped_errors = sum(r["status"] == "error" for r in rows)
            rows = [r for r in rows if r["status"] != "error"]
        self.rows = rows
        if len(complete) != len(data) or retry_errors and self.dropped_errors:
            self._rewrite(rows)

    def _rewrite(self, rows: list[dict]) -> None:
        """The file replaced (atomically) by the header and ``rows``."""
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(HEADER)
                for r in rows:
                    w.writerow([r[c] for c in HEADER])
                f.flush()
                os.fsync(f.fileno())
        write_atomically(self.path, write)

    def done(self) -> set[tuple[str, str]]:
        return {key(r["onnx"], r["vnnlib"]) for r in self.rows}

    def append(self, onnx_path: str, vnnlib_path: str, status: str, time_s: float, method: str,
               reason: str) -> dict:
        row = {"onnx": os.path.relpath(onnx_path), "vnnlib": os.path.relpath(vnnlib_path),
               "status": status, "time_s": f"{time_s:.4f}", "method": method, "reason": reason}
        self._w.writerow([row[c] for c in HEADER])
        self._f.flush()
        os.fsync(self._f.fileno())
        self.rows.append(row)
        return row

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
