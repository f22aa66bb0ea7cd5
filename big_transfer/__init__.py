"""The layer that the three backends (bit_pytorch, bit_tf2, bit_jax) share:
everything about BiT that is not framework code. It imports no framework at
module level; docs/layout.md describes each module.
"""
