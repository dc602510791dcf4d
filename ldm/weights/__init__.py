"""Weights I/O: safe reading (``reading``), the attention-layout renames (``layout``), model loading (``loading``),
the model families (``families``), config detection (``detect``) and conversion (``convert``). Imports only the model (and ``ldm.fileio``)."""
