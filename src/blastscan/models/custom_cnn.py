"""The seed paper's custom CNN, registered as "blastscan_cnn".

Four blocks of conv3x3-BN-ReLU (twice by default) followed by 2x2 max-pooling, with 32/64/128/256 channels; then
global average pooling and a fully connected head: 256 -> ReLU -> dropout -> num_classes. The network outputs
logits; the softmax is applied by the loss and the metrics. Global pooling makes it work at any input size from
64 x 64 up (the feature map is input/16 on a side before pooling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from blastscan.errors import ConfigError
from blastscan.models.factory import HALF_MEAN, HALF_STD, MODELS


class BlastscanCNN(nn.Module):
    """Small VGG-style CNN with timm-like `forward_features` / `forward_head` / `get_classifier`."""

    def __init__(
        self,
        num_classes: int = 2,
        drop_rate: float = 0.3,
        in_chans: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256),
        convs_per_block: int = 2,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        if not widths or any(w <= 0 for w in widths):
            raise ConfigError(f"blastscan_cnn widths must be positive channel counts, got {list(widths)}")
        if convs_per_block not in (1, 2):
            raise ConfigError(f"blastscan_cnn convs_per_block must be 1 or 2, got {convs_per_block}")
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {drop_rate}")
        blocks = []
        channels = in_chans
        for width in widths:
            layers: list[nn.Module] = []
            for _ in range(convs_per_block):
                layers += [
                    nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
            layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_classes = num_classes
        self.num_features = channels
        self.hidden = hidden
        self.drop_rate = drop_rate
        self.head = self._make_head(num_classes)
        # timm-compatible description, read by timm.data.resolve_data_config(model=...).
        self.pretrained_cfg = {
            "mean": HALF_MEAN,
            "std": HALF_STD,
            "input_size": (in_chans, 224, 224),
            "classifier": "head",
        }
        self._init_weights()

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        return nn.Sequential(
            nn.Linear(self.num_features, self.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(self.drop_rate),
            nn.Linear(self.hidden, num_classes),
        )

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for `num_classes` outputs (0: pooled features)."""
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)
        for module in self.head.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, (N, num_features, H/16, W/16)."""
        return self.features(x)

    def forward_intermediates(
        self, x: torch.Tensor, intermediates_only: bool = False
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Every block's output feature map, as timm's `forward_intermediates`: with `intermediates_only` the list,
        else (the last feature map, the list)."""
        maps = []
        for block in self.features:
            x = block(x)
            maps.append(x)
        return maps if intermediates_only else (x, maps)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, (N, num_classes); pooled features when num_classes is 0."""
        return self.forward_head(self.forward_features(x))


_OPTIONS = {"widths", "convs_per_block", "hidden"}


@MODELS.register("blastscan_cnn", mean=HALF_MEAN, std=HALF_STD, input_size=(3, 224, 224))
def blastscan_cnn(num_classes: int = 2, drop_rate: float = 0.3, in_chans: int = 3, **kwargs) -> BlastscanCNN:
    """The seed paper's custom CNN; kwargs: widths, convs_per_block, hidden."""
    unknown = sorted(set(kwargs) - _OPTIONS)
    if unknown:
        raise ConfigError(
            f"blastscan_cnn does not know option(s) {', '.join(unknown)}; it accepts {', '.join(sorted(_OPTIONS))}"
        )
    return BlastscanCNN(num_classes=num_classes, drop_rate=drop_rate, in_chans=in_chans, **kwargs)
