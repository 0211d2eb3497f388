"""HOW it runs: device backends (torch, ONNX Runtime, simulated) behind the `ModelRunner` protocol.

This is the only package that touches hardware APIs.
"""

from mirror_sd.devices.base import DeviceError, ModelRunner, SplitRunner
from mirror_sd.devices.torch_device import TorchDevice, TorchRunner

__all__ = ["DeviceError", "ModelRunner", "SplitRunner", "TorchDevice", "TorchRunner"]
