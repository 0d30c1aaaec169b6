"""mcl_utils: the library behind 'The Law of Multi-Model Collaboration, reproduced and extended'."""

__version__ = "0.1.0"
