"""Sub-commands of the pretrained package."""
