"""Analysis of trained networks: the energy model of eq. 6-7 (``energy``)."""
