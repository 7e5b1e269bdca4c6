"""Single-device model code: the transformer, the MoE layer and its seams. No process groups here."""
