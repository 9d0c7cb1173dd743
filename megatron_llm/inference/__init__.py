"""Using a trained model: generation (KV cache, sampling, streaming), devices, probes and batch inference.
Training never imports this package; it uses only what model/ offers (positions, masks, a cache handle)."""
