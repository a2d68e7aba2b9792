"""Input readers, collection resolution and OME-Zarr output: the only code that touches files."""
