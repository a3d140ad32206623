"""The `ngram` genq family: `spec` (parameters and resources, no torch) and `model` (the torch
implementation genq's workers load)."""
