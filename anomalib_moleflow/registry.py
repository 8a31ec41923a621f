"""Registration of the plugin with anomalib's model lookup (called once, by ``import anomalib_moleflow``)."""

from __future__ import annotations

import anomalib.models

#: Modules from which anomalib's ``get_model`` may import the plugin's classes.
PLUGIN_MODULES: tuple[str, ...] = ("anomalib_moleflow", "anomalib_moleflow.baselines")


def register_with_anomalib() -> None:
    """Let anomalib's ``get_model`` (string and dict forms) and its benchmark pipeline find the plugin's models.

    anomalib only imports classes from modules in ``anomalib.models.ALLOWED_MODULES``. ``get_model("MoleFlow")`` also
    needs ``MoleFlow`` to be a direct ``AnomalibModule`` subclass that has been imported, which importing the plugin
    does. Programs that never import the plugin see anomalib exactly as shipped.
    """
    anomalib.models.ALLOWED_MODULES.update(PLUGIN_MODULES)
