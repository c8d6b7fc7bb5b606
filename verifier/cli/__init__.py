"""The ``verifier`` command line, one module per family of subcommands:

* ``main``: the registry of subcommands and the entry point ``main()`` (the console script
  ``verifier = "verifier.cli:main"`` and ``python -m verifier``);
* ``bounds``, ``weights`` (flatness, sensitivity, delta, the ``--weights`` flags), ``train``,
  ``lipschitz``, ``verify`` (verify, batch, vnncomp-run), ``report``: arguments and commands;
* ``util``: argument types and input checks shared by the commands;
* ``vnncomp_server``: the warm process behind the VNN-COMP scripts in ``vnncomp/``.

Only argument parsing happens at import; torch is imported by the commands that run.
"""
from .main import main

__all__ = ["main"]
