"""The benchmark harness (``harness``: ``ldm-benchmark``) and its parts; it imports the core, the core never imports it."""
