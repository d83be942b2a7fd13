"""NADA Studio's engine: StyleGAN2 in plain PyTorch, checkpoint and weight handling, CLIP-guided domain
adaptation (StyleGAN-NADA), latent editing, and face alignment/inversion. No UI imports here; the CLI is
``python -m nada_core``."""
