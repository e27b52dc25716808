"""Generation: diffusion models that make synthetic counterparts (``[generate]``).

Importing this package is cheap: torch and diffusers are imported when a model is first built
or loaded.
"""
