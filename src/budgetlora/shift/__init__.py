"""Shifted targets: how a target set differs from the training data (analysis), class priors and the gate that
corrects them, prior-corrected predictions, self-training, and one command from data to a submission."""
