"""The fast AltCLIP model: configuration, checkpoint reading, weight key maps, layers, model, outputs."""
