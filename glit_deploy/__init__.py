"""glit-deploy: GLiT architecture search under measured latency, export and serving."""

__version__ = "0.1.0"
