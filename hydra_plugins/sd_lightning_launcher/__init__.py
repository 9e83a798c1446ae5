"""sd_lightning's Hydra launcher plugins (Hydra finds plugins only inside the ``hydra_plugins`` namespace)."""
