"""Training: the CTM + DSM objective, EMAs, the resumable training loop, EDM teacher training."""
