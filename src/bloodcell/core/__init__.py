"""The bottom layer: errors, class names, settings and the model contract. Imports nothing of bloodcell."""
