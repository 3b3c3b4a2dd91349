"""qhnet: quasi-linear hyperbolic ConvNets with a continuous symmetry, in JAX/Flax."""
