"""Drop-in replacements for the peers' samplers and schedulers, on scorefast's fused ops.

``compat.k_diffusion``: k-diffusion's ``sample_*`` functions and sigma schedules, same signatures.
``compat.diffusers``: diffusers schedulers subclassed so that only their arithmetic changes.
Both draw noise from the Philox stream (stream 0, ids arange(B), k = step) unless given noise.
"""
