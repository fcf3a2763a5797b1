"""Backbones cut into L branching blocks."""

from dymu.backbones.base import Backbone, build_backbone
from dymu.backbones.paper import DeepLabMobileNetV2, DeepLabResNet34, ResNet9
from dymu.backbones.small import ConvEncoderDecoder, MLPBackbone

__all__ = ["Backbone", "ConvEncoderDecoder", "DeepLabMobileNetV2", "DeepLabResNet34", "MLPBackbone", "ResNet9",
           "build_backbone"]
