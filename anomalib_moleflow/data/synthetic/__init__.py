"""Procedural MVTec-AD-style anomaly detection dataset used as the project's offline demo.

No real dataset can be downloaded in the demo environment, so this package renders a small but realistic stand-in with
exactly the `MVTec AD <https://www.mvtec.com/company/research/datasets/mvtec-ad>`_ folder layout, loadable by
``anomalib.data.MVTecAD(root=ROOT, category=CATEGORY)``::

    ROOT/CATEGORY/train/good/000.png
    ROOT/CATEGORY/test/good/000.png
    ROOT/CATEGORY/test/<defect_type>/000.png
    ROOT/CATEGORY/ground_truth/<defect_type>/000_mask.png   (single channel, 0 / 255)

Every normal image is a random variation of its category (phase, orientation, position, scale, lighting, sensor
noise). Defects come in three sizes (cycled with the sample index, from about 0.05 % to 5 % of the image) and half of
them are low-contrast. They are alpha-blended into the normal rendering of the same sample, and the ground-truth mask is
the set of pixels whose 8-bit value changed (closed by a 3x3 structuring element and hole-filled), so that outside the
mask a defective image is byte-identical to the normal image of the same sample.

A category folder is only ever written or replaced when it is absent or carries the generator's marker
(:data:`MARKER_NAME`): pointed at a real MVTec AD root, the generator stops with an error instead of touching ``pill/``.

Modules: :mod:`.config` (settings), :mod:`.primitives` (noise and lighting helpers), :mod:`.scenes` (normal
renderers), :mod:`.defects` (defect renderers and masks), :mod:`.sample` (one sample in memory), :mod:`.writer`
(folders on disk) and :mod:`.command` (``moleflow generate-demo``).

Example:
    >>> from anomalib_moleflow.data.synthetic import SyntheticConfig, generate_dataset
    >>> root = generate_dataset("./datasets/synthetic", config=SyntheticConfig(image_size=128))  # doctest: +SKIP
"""

from .command import generate_demo
from .config import DEFAULT_CONFIG, SyntheticConfig
from .defects import DEFECT_TYPES
from .sample import render_sample
from .scenes import DEMO_CATEGORIES, OBJECT_CATEGORIES, TEXTURE_CATEGORIES
from .writer import FORMAT_VERSION, MARKER_NAME, generate_category, generate_dataset

__all__ = [
    "DEFAULT_CONFIG",
    "DEFECT_TYPES",
    "DEMO_CATEGORIES",
    "FORMAT_VERSION",
    "MARKER_NAME",
    "OBJECT_CATEGORIES",
    "TEXTURE_CATEGORIES",
    "SyntheticConfig",
    "generate_category",
    "generate_dataset",
    "generate_demo",
    "render_sample",
]
