"""Other formats in and out: SpikingJelly models (``convert``), NIR (``nir``) and
``torch.export`` programs (``export``)."""
