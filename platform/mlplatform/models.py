"""Segmentation networks: presets built from MONAI, not written by hand.

Every preset maps a 1-channel micrograph to 1-channel logits of the particle mask. Inputs of any size are padded
(reflect) to a multiple of the network's total stride and the output is cropped back, so whole micrographs can be
segmented at evaluation and prediction time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = {
    # small residual U-Net, ~0.1 M parameters, like the lab's published networks
    "compact": {"stride": 8},
    # U-Net with a ResNet-18 encoder, ~14 M parameters, like the reference study
    "resnet18-unet": {"stride": 32},
}


class PaddedSegmenter(nn.Module):
    """Wraps a network so that any H x W works: reflect-pad to the stride, run, crop back."""

    def __init__(self, net: nn.Module, stride: int):
        super().__init__()
        self.net = net
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        return self.net(x)[..., :h, :w]


def build_model(preset: str) -> PaddedSegmenter:
    from monai.networks.nets import FlexibleUNet, UNet

    if preset == "compact":
        net = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16, 32, 64), strides=(2, 2, 2),
                   num_res_units=2)
    elif preset == "resnet18-unet":
        # pretrained=False: nothing is downloaded; the study trains from scratch on simulated data
        net = FlexibleUNet(in_channels=1, out_channels=1, backbone="resnet18", pretrained=False, spatial_dims=2)
    else:
        raise ValueError(f"model.preset={preset!r}; allowed: {', '.join(PRESETS)}")
    return PaddedSegmenter(net, PRESETS[preset]["stride"])


def encoder_parameters(model: PaddedSegmenter, preset: str) -> list[nn.Parameter]:
    """The parameters of the contracting path, for fine-tuning with a frozen encoder."""
    net = model.net
    if preset == "resnet18-unet":
        return list(net.encoder.parameters())
    # MONAI's UNet nests Sequential(down, SkipConnection(Sequential(down, ..., up)), up); the bottom is a plain block
    params: list[nn.Parameter] = []
    block = net.model
    while isinstance(block, nn.Sequential) and len(block) == 3:
        params.extend(block[0].parameters())
        block = block[1].submodule
    params.extend(block.parameters())  # the bottom (bridge) block belongs to the encoder side
    return params


def frozen_parameters(model: PaddedSegmenter, preset: str, which: str) -> list[nn.Parameter]:
    """The parameters a fine-tune leaves untrained: ``encoder`` (:func:`encoder_parameters`), ``decoder`` (all the
    others: the expanding path and the output layer) or ``none``."""
    if which == "none":
        return []
    encoder = encoder_parameters(model, preset)
    if which == "encoder":
        return encoder
    if which == "decoder":
        ids = {id(p) for p in encoder}
        return [p for p in model.parameters() if id(p) not in ids]
    raise ValueError(f"freeze {which!r}; allowed: none, encoder, decoder")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
