"""The speed layer: how liere computes ``exp(sum_a p_a A_a)`` and applies it fast.

The maths is ``liere.definition``; every function here computes the same thing faster and is
tested against it. One technique per module, each with its Note:

==================  ==========================================================================
module              technique
==================  ==========================================================================
``taylor``          Taylor series with scaling and squaring; entry-major small-block products
``extrapolation``   error bound, large-norm warning, Newton-Schulz re-orthogonalisation
``polynomial``      the series as one GEMM of position monomials (one or two axes)
``token_squarings`` per-token squaring counts from spectral norms
``rays``            products along rays on lattices, R(p + q) = R(p) R(q)
``rotations``       the dispatch: few tokens, fast path, ``lie_rotations``
``device``          the device-generic path: no value read on the host (GPUs)
``blockwise``       applying the rotations to q and k
``rope``            RoPE on q and k through the compiled kernel (the RoPE family, 2x2 blocks)
``tracing``         whether a tracer (compile, export, ONNX) is running
==================  ==========================================================================

``liere.kernels`` holds the optional C kernels, ``liere.ops`` the registered operators that
compiled and exported graphs hold, ``liere.precision`` the matmul-precision rule.
``liere.functional`` re-exports the public names. Imports go one way: encodings -> speed
layer -> definition.
"""
