"""Authorization policy (issue #4): Istio AuthorizationPolicy semantics as
data plus pure functions.  See README.md in this directory for the rules.

- :mod:`.model`    frozen values and string matchers
- :mod:`.load`     YAML files -> :class:`~.model.PolicySet` (fails closed)
- :mod:`.evaluate` requests -> decisions; :func:`~.evaluate.compile_l4`
- :mod:`.http`     request-target normalization and framing checks
- :mod:`.lint`     shadowed rules, contradictions, unused selectors
"""
