"""Helpers shared by the test tiers — one home, imported, never copied.

- ``aio``: run a coroutine on uvloop with a bound, poll until, close a writer.
- ``ca``: throwaway CA hierarchies (CertFactory), the fake agent CA on a Unix
  socket (FakeCA), Svid records (make_svid).
- ``http``: small keep-alive HTTP/1.1 servers on loopback that record what
  they receive, and a one-request client.
- ``mesh``: the whole node proxy in-process, two "nodes" on loopback with a
  fake flow table and fake CAs (Cluster).
- ``policy``: AuthorizationPolicy documents and applying them through the
  agent's own PolicyStore.
- ``admin``: the agent's admin server in its own thread, for CLI tests.
- ``mutate``: structural mutations of parsed YAML (Hypothesis loader tests).
- ``privileged``: guards and helpers of the privileged tier (root, netns,
  simulated clusters); ``podhttpd``: the HTTP server run inside pods;
  ``connload``: connection load from a pod that counts where each connection
  went (meshed, bypassed, refused, reset).
"""
