"""Small utilities the rest of the package shares (imported by their module, never all at once).

* `cache` - the package's cache folder and atomic folder writes;
* `hub_utils` - offline mode and a quick Hub reachability probe;
* `model_files` - checks of a model folder's files (one error line naming the file);
* `neighbors` - faiss (with its install hint), exact k-nearest neighbours;
* `precision` - the mixed-precision choice and its autocast context.

Their old import paths (``ccafl_hf.precision``, ``ccafl_hf.cache``, …) keep working for one release.
"""
