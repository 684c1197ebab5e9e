"""Token mixers (attention, Mamba-2), MLP, norms and RoPE."""
