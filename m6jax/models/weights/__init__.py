"""Where pretrained weights come from: sources by name, downloads, torch/Keras file readers."""
