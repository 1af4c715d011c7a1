"""bigcare: CARE restoration of huge microscopy volumes, block by block on Dask."""
