"""Networks: EDM-compatible layers and UNets, preconditioning, released presets, the CTM student, toy MLPs."""
