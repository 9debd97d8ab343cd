"""MAD-Sim, the simulated half of the Multi-pose Anomaly Detection dataset (PAD benchmark, Zhou et
al., NeurIPS 2023 Datasets and Benchmarks): 20 LEGO animals rendered from many poses.

Its public layout is an MVTec AD tree, one folder per toy (``01Gorilla``, ``02Unicorn``, ...)::

    <root>/<category>/train/good/<n>.png
    <root>/<category>/test/{good,Burrs,Missing,Stains}/<n>.png
    <root>/<category>/ground_truth/{Burrs,Missing,Stains}/<n>_mask.png
    <root>/<category>/transforms.json, license, readme   (ignored)

so it is read like MVTec AD (:func:`hybrid.data.mvtec.read_ad_tree`): label 0 for ``good``, 1 for
every defect folder, whose name is the defect type; sample_id ``madsim/<category>/<split>/<defect>/<stem>``.
Category names are kept as the folders spell them. ``transforms.json`` (the training poses) is not
read: the workflow uses the images only.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hybrid.data.mvtec import Categories, read_ad_tree


def read_madsim(root: str | Path, categories: Categories = None, missing: str = "error") -> pd.DataFrame:
    """MAD-Sim: ``<toy>/{train,test}/<defect>/*.png``, masks ``<toy>/ground_truth/<defect>/<stem>_mask.png``."""
    return read_ad_tree(root, categories, missing, "madsim")
