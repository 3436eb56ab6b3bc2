"""What differs between the library releases vtw supports, one small module per library.

- :mod:`vtw.compat.transformers`: transformers 5.17 to the newest 5.x.

(The kernels' own differences, torch and Triton, live in :mod:`vtw_kernels.compat`.)
"""
