"""Compute kernels: each a pure-torch reference, a Triton version and a dispatch here (STYLE.md 5.7).

The first kernel (fused 3-D RoPE) lands with the AST-RoPE capability; until then this package is empty."""
