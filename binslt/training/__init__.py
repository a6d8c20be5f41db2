"""The search and training loop (``loop``, with its config ``config``, errors ``errors``, process
set-up ``runtime`` and early-time tickets ``early_time``), the datasets (``data``) and the seed
statistics (``stats``)."""
