"""Training: the LightningModule, class-imbalance losses and samplers, and `fit()`."""
