"""Registration of the plugin with anomalib's model lookup."""

from __future__ import annotations

import anomalib.models

PLUGIN_MODULE = "anomalib_moleflow"


def register_with_anomalib() -> None:
    """Let anomalib's ``get_model`` (string, dict and ``anomalib benchmark`` forms) find ``MoleFlow``.

    anomalib only imports classes from modules in ``anomalib.models.ALLOWED_MODULES``; the plugin adds its own
    module there, and exposes ``MoleFlow`` in ``anomalib.models`` for the bare ``class_path: MoleFlow`` form.
    ``get_model("MoleFlow")`` needs nothing: anomalib finds every direct ``AnomalibModule`` subclass.
    """
    from anomalib_moleflow.models import MoleFlow

    anomalib.models.ALLOWED_MODULES.update({PLUGIN_MODULE, f"{PLUGIN_MODULE}.baselines"})
    if not hasattr(anomalib.models, "MoleFlow"):
        anomalib.models.MoleFlow = MoleFlow
