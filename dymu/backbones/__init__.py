"""Backbones cut into L branching blocks."""

from dymu.backbones.base import Backbone, build_backbone
from dymu.backbones.small import ConvEncoderDecoder, MLPBackbone

__all__ = ["Backbone", "ConvEncoderDecoder", "MLPBackbone", "build_backbone"]
