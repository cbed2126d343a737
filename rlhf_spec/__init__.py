"""rlhf-spec: run a whole RLHF pipeline from one declarative JSON spec.

The public surface for plugin authors is :mod:`rlhf_spec.hookspecs`
(``hookimpl``, ``StageImpl``) and :mod:`rlhf_spec.context` (``StageContext``).
"""

__version__ = "0.1.0"
