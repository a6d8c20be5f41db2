"""The modules: the masked sign-weight spiking layers (``layers``) and the paper's networks
(``models``). They call the op layer (``binslt.ops``) once per layer call."""
