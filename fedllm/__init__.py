"""fedllm: privacy-preserving federated fine-tuning of LLMs."""
__version__ = "0.1.0"
