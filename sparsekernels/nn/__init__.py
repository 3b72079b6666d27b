"""``nn.Module`` wrappers around the ops, whole-model swap, and ahead-of-time tuning."""
