"""The operator console: web pages, ``/metrics``, ``/healthz``, ``/readyz`` and STOW-RS, served by
``synthnode serve`` on ``[console] port``."""
