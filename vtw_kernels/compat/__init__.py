"""Version-dependent behaviour, one small module per library.

Everything in vtw that depends on the version of a library lives in the module named after it
(``compat.torch`` for torch, ``compat.triton`` for Triton; the integration layer's
``vtw.compat.transformers`` for transformers), with a docstring saying what differs between the supported
versions and why; the rest of the code calls it and carries no version checks of its own.
"""
