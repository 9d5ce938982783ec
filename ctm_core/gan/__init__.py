"""The optional GAN phase and perceptual distance: DiffAugment, discriminators, the adversarial terms, LPIPS."""
