"""The reference model's plumbing: loading, freezing and lightening it (`loading`), the precomputed reference's
columns and cache (`cache`), and how both models' heads reach the fused loss without building logits (`lm_head`).

Imports `losses` and the libraries; never the trainer, `scripts`, `evaluation` or `quickstart`.
"""
