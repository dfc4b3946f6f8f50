"""Token selection from deviation scores (torch on every device: a sort of one score per token)."""
