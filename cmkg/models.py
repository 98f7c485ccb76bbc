"""Pose regressors: torchvision ResNets (weights=None) with activation taps.

The first convolution takes the modality's channels (RGB 3, depth 1); the head regresses the
21x3 root-relative, scale-normalised joints. ``forward`` returns the joints and the activation
maps of layer1..layer4, the Q_j of Eqs. 2-3.

Backbones:
- ``resnet18``, ``resnet50``: torchvision's, as in the paper (Sect. 5.1).
- ``resnet10``: torchvision's ``ResNet(BasicBlock, [1, 1, 1, 1])``, a CPU-sized variant used by
  the ``smoke`` and ``cpu`` presets (reports name it as such; it is not a paper backbone).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock, ResNet

from cmkg.config import BACKBONES as BACKBONE_NAMES
from cmkg.hand import NUM_JOINTS

BACKBONES = {
    "resnet10": lambda: ResNet(BasicBlock, [1, 1, 1, 1]),
    "resnet18": lambda: resnet18(weights=None),
    "resnet50": lambda: resnet50(weights=None),
}
MODALITY_CHANNELS = {"rgb": 3, "depth": 1}
assert tuple(BACKBONES) == BACKBONE_NAMES, "cmkg.config.BACKBONES and the backbone table disagree"


class PoseNet(nn.Module):
    """ResNet regressor: (B, C, H, W) -> joints (B, 21, 3) and [Q_1..Q_4] activation maps."""

    def __init__(self, arch: str, in_channels: int):
        super().__init__()
        if arch not in BACKBONES:
            raise ValueError(f"unknown backbone {arch!r}; choose one of {', '.join(BACKBONES)}")
        net = BACKBONES[arch]()
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.arch, self.in_channels = arch, in_channels
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.head = nn.Linear(net.fc.in_features, NUM_JOINTS * 3)
        self.channels = [blocks[-1].conv2.out_channels if isinstance(blocks[-1], BasicBlock)
                         else blocks[-1].conv3.out_channels for blocks in self.layers]

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        acts = []
        h = self.stem(x)
        for layer in self.layers:
            h = layer(h)
            acts.append(h)
        joints = self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))
        return joints.view(-1, NUM_JOINTS, 3), acts


def build(arch: str, modality: str, extra_channels: int = 0) -> PoseNet:
    """A regressor of ``modality``, with ``extra_channels`` more input channels (the planted
    channels of ``data.planted``, a positive control)."""
    return PoseNet(arch, MODALITY_CHANNELS[modality] + extra_channels)


def activation_adapter(student: PoseNet, teacher: PoseNet) -> nn.Module:
    """1x1 conv mapping the student's last activation to the teacher's width for L_ACT (Eq. 2),
    needed when they differ (ResNet-18: 512 vs ResNet-50: 2048); identity otherwise."""
    s, t = student.channels[-1], teacher.channels[-1]
    return nn.Identity() if s == t else nn.Conv2d(s, t, kernel_size=1, bias=False)


class StudentWithAdapter(nn.Module):
    """The kd stage's trainable module: student plus L_ACT adapter behind one ``forward``, so a
    data-parallel wrapper (DDP) sees and syncs both. Returns joints, activations and the
    adapted last activation map."""

    def __init__(self, student: PoseNet, adapter: nn.Module):
        super().__init__()
        self.student, self.adapter = student, adapter

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        joints, acts = self.student(x)
        return joints, acts, self.adapter(acts[-1])
