"""mirror-sd: a heterogeneous-device runtime for lossless Mirror speculative decoding."""

__version__ = "0.1.0"
