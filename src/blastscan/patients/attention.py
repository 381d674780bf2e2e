"""Attention-based multiple-instance learning (gated attention, Ilse et al. 2018) over a patient's cell embeddings.

A patient is a bag of cells. Each cell embedding is projected, a gated attention network gives each cell a weight
(softmax over the patient's cells), the weighted mean is the patient's representation, optionally joined by the
clinical covariates, and a linear head gives the logit. The weights say which cells the call rests on (the
galleries of `blastscan patients`).

The embeddings are standardised and reduced by PCA to `components` dimensions (both fitted on the training
patients' cells only), bags are padded to the largest one and trained a few bags per step, padding masked out of
the softmax: one step per mini-batch instead of one per patient, on 128 instead of 1,280 inputs, keeps a fit
short, which nested cross-validation (the network is fitted hundreds of times) needs. The loop is a
plain PyTorch one, not Lightning, for the same reason: Lightning's per-fit setup would cost more than the fit.
Training length is fixed (no early stopping on held-out patients, which would leak them into the model choice).
Fits run on one thread: for a network this small, thread hand-offs cost more than they save (several times
slower on two threads in a development check on the 2-core machine while other work ran; not a benchmark).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits
from torch import nn

from blastscan.patients.bags import ClinicalEncoder, PatientBags


class GatedAttentionPool(nn.Module):
    """Padded bags (B, n, D) with a mask (B, n) [+ covariates (B, C)] -> (logits (B,), attention weights (B, n))."""

    def __init__(self, dim: int, hidden: int = 64, attention: int = 32, covariates: int = 0, dropout: float = 0.25):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.gate_tanh = nn.Linear(hidden, attention)
        self.gate_sigmoid = nn.Linear(hidden, attention)
        self.score = nn.Linear(attention, 1)
        self.head = nn.Linear(hidden + covariates, 1)

    def forward(
        self, cells: torch.Tensor, mask: torch.Tensor, covariates: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(cells)
        scores = self.score(torch.tanh(self.gate_tanh(h)) * torch.sigmoid(self.gate_sigmoid(h))).squeeze(-1)
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
        pooled = (weights[..., None] * h).sum(dim=1)
        if covariates is not None:
            pooled = torch.cat([pooled, covariates], dim=1)
        return self.head(pooled).squeeze(-1), weights


def padded(bags: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of (n_i, D) rows -> (B, max n, D) zero-padded tensor and its (B, max n) mask of real cells."""
    longest = max(len(b) for b in bags)
    cells = torch.zeros((len(bags), longest, bags[0].shape[1]), dtype=torch.float32)
    mask = torch.zeros((len(bags), longest), dtype=torch.bool)
    for i, bag in enumerate(bags):
        cells[i, : len(bag)] = torch.as_tensor(bag, dtype=torch.float32)
        mask[i, : len(bag)] = True
    return cells, mask


@contextmanager
def one_thread() -> Iterator[None]:
    """PyTorch and the BLAS/OpenMP pools on one thread inside the block, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


class AttentionMILModel:
    """Gated-attention MIL on per-cell embeddings (one row per manifest row), with the clinical covariates when
    `clinical` is set. Class-balanced loss (positive weight = negatives / positives of the training patients),
    Adam, `epochs` passes over the training patients in mini-batches of `batch_bags` patients."""

    def __init__(
        self,
        embeddings: np.ndarray,
        clinical: bool = False,
        epochs: int = 30,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        batch_bags: int = 8,
        components: int = 128,
        seed: int = 0,
    ) -> None:
        self.embeddings = embeddings
        self.clinical = clinical
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_bags = batch_bags
        self.components = components
        self.seed = seed

    def _inputs(self, bags: PatientBags) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        cells, mask = padded([self._reduced(self.embeddings[rows]) for rows in bags.cells])
        covariates = None
        if self.clinical:
            covariates = torch.as_tensor(self.encoder_.transform(bags.clinical), dtype=torch.float32)
        return cells, mask, covariates

    def _reduced(self, cells: np.ndarray) -> np.ndarray:
        return ((cells - self.mean_) / self.std_ - self.center_) @ self.projection_

    def _network(self) -> GatedAttentionPool:
        return GatedAttentionPool(self.projection_.shape[1], covariates=4 if self.clinical else 0)

    def fit(self, bags: PatientBags) -> AttentionMILModel:
        with one_thread():
            return self._fit(bags)

    def _fit(self, bags: PatientBags) -> AttentionMILModel:
        training_cells = np.concatenate(bags.cells)
        self.mean_ = self.embeddings[training_cells].mean(axis=0)
        self.std_ = self.embeddings[training_cells].std(axis=0) + 1e-6
        standardised = (self.embeddings[training_cells] - self.mean_) / self.std_
        components = min(self.components, *standardised.shape)
        pca = PCA(components, svd_solver="randomized", random_state=self.seed).fit(standardised)
        self.center_, self.projection_ = pca.mean_, pca.components_.T
        self.encoder_ = ClinicalEncoder().fit(bags.clinical)
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        self.network_ = self._network()
        optimiser = torch.optim.Adam(self.network_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        labels = torch.as_tensor(bags.labels, dtype=torch.float32)
        positive_weight = torch.tensor((labels == 0).sum().item() / max((labels == 1).sum().item(), 1))
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=positive_weight)
        cells, mask, covariates = self._inputs(bags)
        self.network_.train()
        for _ in range(self.epochs):
            for batch in torch.randperm(len(labels), generator=generator).split(self.batch_bags):
                logits, _ = self.network_(cells[batch], mask[batch], None if covariates is None else covariates[batch])
                loss = loss_fn(logits, labels[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        self.network_.eval()
        return self

    @torch.no_grad()
    def predict_proba(self, bags: PatientBags) -> np.ndarray:
        return torch.sigmoid(self.network_(*self._inputs(bags))[0]).numpy().astype(float)

    @torch.no_grad()
    def attention(self, bags: PatientBags) -> list[np.ndarray]:
        """Each patient's attention weight per cell (in `bags.cells` order)."""
        cells, mask, covariates = self._inputs(bags)
        weights = self.network_(cells, mask, covariates)[1].numpy()
        return [weights[i, : len(rows)] for i, rows in enumerate(bags.cells)]

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(settings, arrays) of the fitted model, for `blastscan.patients.persist` (no pickle)."""
        arrays = {"mean": self.mean_, "std": self.std_, "center": self.center_, "projection": self.projection_}
        arrays |= {f"network.{k}": v.numpy() for k, v in self.network_.state_dict().items()}
        settings = {"clinical": self.clinical, "epochs": self.epochs, "lr": self.lr,
                    "weight_decay": self.weight_decay, "batch_bags": self.batch_bags, "components": self.components,
                    "seed": self.seed,
                    "encoder": self.encoder_.state()}  # fmt: skip
        return settings, arrays

    @classmethod
    def from_state(
        cls, settings: dict[str, Any], arrays: dict[str, np.ndarray], embeddings: np.ndarray
    ) -> AttentionMILModel:
        """The fitted model back from `state()`, applied to `embeddings` (one row per manifest row of a cohort)."""
        model = cls(embeddings, **{k: v for k, v in settings.items() if k != "encoder"})
        model.mean_, model.std_ = arrays["mean"], arrays["std"]
        model.center_, model.projection_ = arrays["center"], arrays["projection"]
        model.encoder_ = ClinicalEncoder.from_state(settings["encoder"])
        model.network_ = model._network()
        prefix = "network."
        model.network_.load_state_dict(
            {k[len(prefix) :]: torch.as_tensor(v) for k, v in arrays.items() if k.startswith(prefix)}
        )
        model.network_.eval()
        return model
