"""divrl: RL post-training of subject-driven image generators (DivRL on FLUX.1 Kontext) as a Lightning app."""

__version__ = "0.1.0.dev0"
