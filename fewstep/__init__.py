"""fewstep: distill multi-step diffusion and flow models into few-step generators."""
__version__ = "0.1.0"
