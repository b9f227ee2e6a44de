"""memsvc.kernels: the math of every tier (codecs, bit packing, attention over packed blocks).

Imports only torch and triton. Each operation has a pure-torch reference (the
CPU path) and a Triton kernel with the same signature; `codec.use_reference()`
decides which runs.
"""
