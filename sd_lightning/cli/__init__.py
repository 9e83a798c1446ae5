"""The command-line entry points (``scripts.py`` is what the console scripts call).

Importing this package filters the named third-party notices first (``scripts.silence_known_noise``), so that
``python -m sd_lightning.cli.<name>`` is as quiet as the console scripts.
"""

from sd_lightning.cli.scripts import silence_known_noise

silence_known_noise()
