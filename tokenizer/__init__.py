"""DOVE / Q-DOVE: images to a variable number of continuous visual tokens, and back.

Layout: `modeling/` is the model and all that loading it needs, `training/` trains it, `evaluation/`
measures it; `hub.py` is the atomic, verified file I/O that all three and the VLM share.
"""

# The public names are the model's, listed once in modeling/__init__.py.
from .modeling import *  # noqa: F403  (the public names are listed once, in modeling.__all__)
from .modeling import __all__ as __all__
