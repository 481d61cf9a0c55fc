"""Explain: where in the image a model's decision comes from, and whether the explanation is about the model.

``explain`` computes class activation maps (Grad-CAM and relatives) at the last spatial feature map,
``overlay`` lays one over its image, ``sanity_check`` runs the model-parameter randomization test
(Adebayo et al. 2018), and ``looks_at`` picks the report's examples.
"""

from fovea.explain._cam import (
    METHODS,
    Explanation,
    blank_forward,
    explain,
    find_target_layer,
    resolve_layer,
    single_model,
)
from fovea.explain._cam import _net_maps as net_maps  # maps of a bare network (no artifact around it)
from fovea.explain._overlay import Overlays, explain_files, looks_at, overlay
from fovea.explain._sanity import SanityResult, rank_correlation, sanity_check

__all__ = ["METHODS", "Explanation", "Overlays", "SanityResult", "blank_forward", "explain", "explain_files",
           "find_target_layer", "looks_at", "net_maps", "overlay", "rank_correlation", "resolve_layer", "sanity_check",
           "single_model"]
