"""linearize: turn pretrained Hugging Face LLMs into linear-time models."""
