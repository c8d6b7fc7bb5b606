"""A warm verifier process for the VNN-COMP scripts, so that each instance does not pay for
importing torch, onnx and onnxruntime (a few seconds of CPU on a 2-core machine).

``prepare_instance.sh`` starts ``python -m verifier.cli.vnncomp_server serve SOCKET`` once (it
only imports; no analysis of the instance happens before ``run_instance.sh``), and
``run_instance.sh`` runs ``python -m verifier.cli.vnncomp_server run SOCKET CATEGORY ONNX VNNLIB
RESULTS TIMEOUT``: a small client (no torch import) that hands the instance to the server and
waits. Without a server, or if the server fails to answer, the client runs the instance itself.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from .verify import run_instance


def serve(path: str) -> int:
    # the imports are the point: warm them here, not at the top, so that the client (``run``)
    # starts without torch
    import torch
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401

    from ..complete import verify  # noqa: F401
    from ..graph import onnx_ops  # noqa: F401  (the ONNX reader's op table)
    torch.set_num_threads(1)
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # appears only once the server is ready
    srv.listen(1)
    while True:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            try:
                req = json.loads(data)
            except ValueError:
                continue
            if req.get("cmd") == "stop":
                conn.sendall(b'{"ok": true}\n')
                srv.close()
                os.unlink(path)
                return 0
            status = _run(req)
            conn.sendall((json.dumps({"ok": True, "status": status}) + "\n").encode())


def _run(req) -> str:
    r = run_instance(req["onnx"], req["vnnlib"], float(req["timeout"]))
    text = r["status"] + "\n"
    v = r["verdict"]
    if v is not None and v.status == "sat":
        text += v.counterexample.vnncomp_text() + "\n"
    with open(req["results"], "w") as f:
        f.write(text)
    return r["status"]


def run(path, category, onnx_path, vnnlib_path, results, timeout) -> int:
    req = {"category": category, "onnx": os.path.abspath(onnx_path),
           "vnnlib": os.path.abspath(vnnlib_path), "results": os.path.abspath(results),
           "timeout": float(timeout)}
    if os.path.exists(path):
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(float(timeout) + 15)
            s.connect(path)
            s.sendall((json.dumps(req) + "\n").encode())
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
            if json.loads(reply).get("ok"):
                return 0
        except (OSError, ValueError):
            pass
    # no (working) server: run in this process
    return subprocess.call([sys.executable, "-m", "verifier", "vnncomp-run", category, onnx_path,
                            vnnlib_path, results, str(timeout)])


def start(path: str, wait_s: float = 60.0) -> int:
    """Start a server in the background unless one answers already; wait until it is ready."""
    if os.path.exists(path):
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.close()
            return 0
        except OSError:
            os.unlink(path)
    subprocess.Popen([sys.executable, "-m", "verifier.cli.vnncomp_server", "serve", path],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < wait_s:
        if os.path.exists(path):
            return 0
        time.sleep(0.05)
    return 1


def stop(path: str) -> int:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(b'{"cmd": "stop"}\n')
        s.recv(100)
    except OSError:
        pass
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "serve":
        return serve(argv[1])
    if len(argv) >= 2 and argv[0] == "start":
        return start(argv[1])
    if len(argv) >= 2 and argv[0] == "stop":
        return stop(argv[1])
    if len(argv) == 7 and argv[0] == "run":
        return run(*argv[1:])
    print("usage: python -m verifier.cli.vnncomp_server serve|start|stop SOCKET | "
          "run SOCKET CATEGORY ONNX VNNLIB RESULTS TIMEOUT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
