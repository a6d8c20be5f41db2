"""Files on disk: run directories, checkpoints and model rebuilding (``artifacts``) and the
packed safetensors tickets (``tickets``)."""
