"""Experts offloaded to host memory, an expert slot cache on the device under a byte budget.

``ExpertStore`` (host) -> ``SlotCache`` (device slots, resident map) -> ``OffloadedExperts``
(the MoE layers' executor and the engine's plan handler); ``OffloadSession`` runs the core
scheduler's planners on the real engine. See docs/offloading.md.
"""
