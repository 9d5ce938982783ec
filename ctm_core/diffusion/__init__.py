"""Diffusion maths: the Karras σ-grid, Heun/γ samplers, the exact PF-ODE likelihood, Gaussian closed forms."""
