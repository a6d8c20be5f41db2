"""Other formats in and out: SpikingJelly models (``convert``), NIR (``nir``; reading in
``nir_read``, ``nir_units``, ``nir_format``) and ``torch.export`` programs (``export``)."""
