"""csc: train segmentation models on CellMap-style volume EM data.

Importing csc is cheap: submodules that need numpy, zarr or torch are imported when used.
"""

__version__ = "0.1.0"
