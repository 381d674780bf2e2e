"""Classical baselines: segmentation of the central leukocyte and handcrafted features as scikit-learn transformers.

`segmentation.segment_cell` finds the nucleus and cell of a single-cell crop; `features` turns images into
morphology, colour and texture feature tables (`MorphologyFeatures`, `ColourFeatures`, `TextureFeatures`,
`HandcraftedFeatures`) for any scikit-learn classifier.
"""
