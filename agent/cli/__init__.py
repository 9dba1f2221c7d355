"""The ``meshlet`` command line, one module per command group:

- :mod:`.root`: the ``meshlet`` group itself (``main``), which gathers the others;
- :mod:`.node`: the agent's life on this node: ``run``, ``doctor``, ``status``, ``workloads``;
- :mod:`.bpf`: ``bpf status`` and ``bpf render``, read straight from bpffs and the C sources;
- :mod:`.observe`: what traffic does: ``flows``, ``stats``, ``services``;
- :mod:`.ca`: the mesh CA (``ca ...``) and the workload certificates (``certs``);
- :mod:`.validate`: offline checks of inventory and agent config files;
- :mod:`.policy`: ``policy ...``, offline (validate, explain, lint) and through the agent;
- :mod:`.common`: the ``-o`` option, errors and exit codes, JSON and tables, the admin API.

``meshlet = "agent.cli:main"`` (pyproject.toml) and ``python -m agent.cli`` both run :func:`main`.
"""

from .root import main

__all__ = ["main"]
