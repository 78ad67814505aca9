"""The reference: which model the KL term anchors to, as one `Reference` chosen from the config (`build`), and its
plumbing: loading, freezing and lightening it (`loading`), the precomputed reference's pass (`precompute`), columns and
cache (`cache`), and how both models' heads reach the fused loss without building logits (`lm_head`).

Imports `losses`, `utils` and the libraries; never the trainer, `scripts`, `evaluation` or `quickstart`.
"""
