"""Kernels: Pallas flash attention for packed prefix-LM rows (flash_attention), its dense oracle
(reference), and the chunked output projection + cross-entropy (cross_entropy)."""
