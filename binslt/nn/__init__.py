"""The modules: the masked sign-weight spiking layers (``layers``, which gathers them from
``base``, ``neuron``, ``weight``, ``spiking``, ``conv``, ``linear``, ``binary`` and ``pool``) and
the paper's networks (``models``; their parts in ``blocks``, the network class in ``network``,
counting in ``counting``). They call the op layer (``binslt.ops``) once per layer call."""
