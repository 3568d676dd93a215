"""otc-ray: Ray-distributed CLIP pre-training robust to data poisoning (OTCCLIP)."""
__version__ = "0.1.0"
