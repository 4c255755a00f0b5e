"""groundlabel: automatic pre-labelling for segmentation datasets."""

__version__ = "0.1.0"
