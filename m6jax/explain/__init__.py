"""Grad-CAM for the conv towers, its gallery, and the explain CLI over a finished run."""
