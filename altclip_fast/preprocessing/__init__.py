"""Turning text and images into model inputs: tokenizer, image processor, processor."""
