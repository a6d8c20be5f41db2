"""Other formats in and out: SpikingJelly models (``convert``, built from ``sj_modules``,
``sj_graph``, ``convert_chains``, ``convert_swap``, ``convert_modules``, ``convert_tickets`` and
``user_model``; ``sj_tools`` for SpikingJelly's monitors and op counters), NIR (``nir``; reading
in ``nir_read``, ``nir_units``, ``nir_format``) and ``torch.export`` programs (``export``)."""
