"""Attention-based multiple-instance learning (gated attention, Ilse et al. 2018) over a patient's cell embeddings.

A patient is a bag of cells. Each cell embedding is projected, a gated attention network gives each cell a weight
(softmax over the patient's cells), the weighted mean is the patient's representation, optionally joined by the
clinical covariates, and a linear head gives the logit. The weights say which cells the call rests on (the
galleries of `blastscan patients`).

The loop is a plain PyTorch one, not Lightning: nested cross-validation fits this tiny network hundreds of times on
a few dozen bags, where Lightning's per-fit setup would cost more than the fit. Training length is fixed (no early
stopping on held-out patients, which would leak them into the model choice).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from blastscan.patients.bags import ClinicalEncoder, PatientBags


class GatedAttentionPool(nn.Module):
    """Cells (n, D) [+ covariates (C,)] -> (logit, attention weights (n,))."""

    def __init__(self, dim: int, hidden: int = 64, attention: int = 32, covariates: int = 0, dropout: float = 0.25):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.gate_tanh = nn.Linear(hidden, attention)
        self.gate_sigmoid = nn.Linear(hidden, attention)
        self.score = nn.Linear(attention, 1)
        self.head = nn.Linear(hidden + covariates, 1)

    def forward(self, cells: torch.Tensor, covariates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(cells)
        weights = torch.softmax(
            self.score(torch.tanh(self.gate_tanh(h)) * torch.sigmoid(self.gate_sigmoid(h))).squeeze(-1), dim=0
        )
        pooled = (weights[:, None] * h).sum(dim=0)
        if covariates is not None:
            pooled = torch.cat([pooled, covariates])
        return self.head(pooled).squeeze(-1), weights


class AttentionMILModel:
    """Gated-attention MIL on per-cell embeddings (one row per manifest row), with the clinical covariates when
    `clinical` is set. Class-balanced loss (positive weight = negatives / positives of the training patients)."""

    def __init__(
        self,
        embeddings: np.ndarray,
        clinical: bool = False,
        epochs: int = 30,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        seed: int = 0,
    ) -> None:
        self.embeddings = embeddings
        self.clinical = clinical
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed

    def _bags(self, bags: PatientBags) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        covariates = self.encoder_.transform(bags.clinical) if self.clinical else None
        return [
            (
                torch.as_tensor((self.embeddings[rows] - self.mean_) / self.std_, dtype=torch.float32),
                None if covariates is None else torch.as_tensor(covariates[i], dtype=torch.float32),
            )
            for i, rows in enumerate(bags.cells)
        ]

    def fit(self, bags: PatientBags) -> AttentionMILModel:
        training_cells = np.concatenate(bags.cells)
        self.mean_ = self.embeddings[training_cells].mean(axis=0)
        self.std_ = self.embeddings[training_cells].std(axis=0) + 1e-6
        self.encoder_ = ClinicalEncoder().fit(bags.clinical)
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        covariates = 4 if self.clinical else 0
        self.network_ = GatedAttentionPool(self.embeddings.shape[1], covariates=covariates)
        optimiser = torch.optim.Adam(self.network_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        labels = torch.as_tensor(bags.labels, dtype=torch.float32)
        positive_weight = torch.tensor((labels == 0).sum().item() / max((labels == 1).sum().item(), 1))
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=positive_weight)
        data = self._bags(bags)
        self.network_.train()
        for _ in range(self.epochs):
            for i in torch.randperm(len(data), generator=generator).tolist():
                logit, _ = self.network_(*data[i])
                loss = loss_fn(logit[None], labels[i : i + 1])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        self.network_.eval()
        return self

    @torch.no_grad()
    def predict_proba(self, bags: PatientBags) -> np.ndarray:
        return np.array([torch.sigmoid(self.network_(*bag)[0]).item() for bag in self._bags(bags)])

    @torch.no_grad()
    def attention(self, bags: PatientBags) -> list[np.ndarray]:
        """Each patient's attention weight per cell (in `bags.cells` order)."""
        return [self.network_(*bag)[1].numpy() for bag in self._bags(bags)]
