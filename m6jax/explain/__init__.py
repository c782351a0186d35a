"""Grad-CAM for the conv towers, its gallery, and explaining a run's states (in memory or
restored; the explain CLI)."""
