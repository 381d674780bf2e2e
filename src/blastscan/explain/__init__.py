"""Explaining a trained network: Grad-CAM family heat maps (pytorch-grad-cam) and feature-map grids.

`compute_cams` turns a normalised batch into (B, H, W) maps in [0, 1] with "gradcam", "gradcam++", "scorecam" or
"eigencam" on the layer `target_layer` chooses for any model `blastscan.models.create` builds; `explain_images`
writes overlays and an `explanations.csv` for a run's model; `feature_map_grid` and `overlay_grid` draw figures.
The functions live in `blastscan.explain.cam`.
"""
