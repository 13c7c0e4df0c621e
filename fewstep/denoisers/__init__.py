"""Denoisers: one interface over every network (x0_hat for (x_t, t, cond))."""
from .base import Cond, Denoiser, guidance_embedding
from .flux import FluxDenoiser
from .mixture import MixtureDenoiser
from .mlp import MLPDenoiser, MLPNet
from .transformer import SD3Denoiser
from .unet import UNetDenoiser

__all__ = ["Cond", "Denoiser", "FluxDenoiser", "MLPDenoiser", "MLPNet", "MixtureDenoiser", "SD3Denoiser", "UNetDenoiser", "guidance_embedding"]
