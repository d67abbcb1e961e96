"""The model step of every engine: a batch of crops or tokenized captions -> float32 embeddings."""

from __future__ import annotations

import numpy as np


def encode(session, modality: str, payload, normalize: bool) -> np.ndarray:
    """``modality`` "image": ``payload`` is a uint8 ``[B, 3, H, W]`` tensor; "text": the tokenizer's output."""
    import torch

    model, device = session.model, session.device
    with torch.inference_mode():
        if modality == "image":
            # Normalised on the model's device: uint8 travels, float32 is made where it is used.
            pixels = session.processor.image_processor.to_pixel_values_torch(payload.to(device))
            features = model.get_image_features(pixels.to(session.dtype),
                                                interpolate_pos_encoding=session.interpolate_pos_encoding)
        else:
            features = model.get_text_features(payload["input_ids"].to(device), payload["attention_mask"].to(device))
        features = features.float()
        if normalize:
            features = features / features.norm(dim=-1, keepdim=True)
        return features.cpu().numpy()


def encode_texts(session, texts: list[str], batch_size: int, normalize: bool) -> np.ndarray:
    """Captions in batches of ``batch_size`` -> ``[len(texts), dim]``."""
    tokenizer = session.processor.tokenizer
    parts = [encode(session, "text", tokenizer(texts[s:s + batch_size]), normalize)
             for s in range(0, len(texts), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, session.model.config.projection_dim), np.float32)
