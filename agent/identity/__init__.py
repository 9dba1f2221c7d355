"""Workload identity: SPIFFE IDs, X.509-SVIDs and the meshlet CA on disk.

Pure and synchronous (``cryptography`` + stdlib; no sockets, no asyncio):

- ``spiffe``: parse and build SPIFFE IDs, strictly per the spec.
- ``certs``: trust bundles, CSRs, issuing SVIDs and verifying SVID chains,
  with a stable reason code on every refusal (``SvidError.reason``).
- ``ca``: the root + per-node intermediate CA hierarchy kept in a directory
  (init, add/reissue a node, rotate and retire roots).
"""
