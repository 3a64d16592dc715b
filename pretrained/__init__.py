"""The brat model, its losses and ablations, pretraining and checkpoint I/O."""
