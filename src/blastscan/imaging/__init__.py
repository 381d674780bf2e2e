"""Image methods shared by training, inference, baselines and explanations: what a model is fed (`preprocess`),
stain normalisation and jitter (`stain`), batched augmentation (`augment`) and cell segmentation (`segmentation`)."""
