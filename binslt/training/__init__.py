"""The search and training loop (``loop``), the datasets (``data``) and the seed statistics
(``stats``)."""
