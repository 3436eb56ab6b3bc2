"""Version-dependent behaviour, one small module per library.

Everything in vtw that depends on the version of a library lives in the module named after it
(``compat.triton`` for Triton), with a docstring saying what differs between the supported
versions and why; the rest of the code calls it and carries no version checks of its own.
"""
