"""Differentiable image operations shared by the distortion layer (`segue_dist.distortion`, training G) and the
attacker (`segue_dist.attacks`, training victims): one Gaussian blur, one L∞ PGD, the surrogate's cross-entropy. Library code: tensors in,
tensors out, no I/O."""

from segue_dist.ops.blur import gaussian_blur
from segue_dist.ops.losses import view_cross_entropy
from segue_dist.ops.pgd import pgd_delta

__all__ = ["gaussian_blur", "pgd_delta", "view_cross_entropy"]
