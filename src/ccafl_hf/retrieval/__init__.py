"""Using a trained model: embed images, index a gallery with faiss, search it, export to ONNX.

The pieces, each usable alone::

    model, image_processor = load_reid_model("outputs/ccafl-demo")
    gallery = embed_folder(model, "gallery_images/", image_processor)      # FeatureSet [N, D] + paths
    gallery.save("gallery.safetensors")
    index = build_index(gallery.features)                                  # exact inner product
    save_index(index, "gallery.faiss")
    queries = embed_folder(model, "query_images/", image_processor)
    results = search_gallery(index, gallery, queries, k=10)                # paths + scores per query

* `loading` - `load_reid_model`, `eval_transform_for`: a saved model, its preprocessing;
* `features` - `FeatureSet` (the features-file format) and `embed_images` / `embed_folder` / `embed_split`;
* `index` - the faiss index life cycle (`build_index`, `index_recall`, `save_index`, `load_index`) and
  search (`search`, `search_gallery`);
* `onnx` - `export_onnx` / `verify_onnx`: the image tower as an ONNX graph;
* `tracking` - `embed_detections` (a frame's boxes -> features) and `link_tracklets` (tracklets of several
  cameras -> global ids, by the ICAL association), `link_mot_scene` for a MOTChallenge-layout folder.

Retrieval features are L2-normalised, so inner product = cosine similarity.
"""

from .errors import RetrievalError
from .features import (
    FEATURES_FORMAT,
    FEATURES_FORMAT_VERSION,
    FeatureSet,
    embed_folder,
    embed_images,
    embed_split,
    list_images,
)
from .index import (
    IndexKind,
    Match,
    QueryResult,
    build_index,
    default_nlist,
    index_recall,
    load_index,
    save_index,
    search,
    search_gallery,
    set_nprobe,
)
from .loading import eval_transform_for, load_reid_model
from .onnx import ReIDFeatureModule, export_onnx, onnxruntime_available, require_onnx, verify_onnx
from .tracking import (
    TrackletLinks,
    crop_boxes,
    embed_detections,
    link_metrics,
    link_mot_scene,
    link_tracklets,
)

__all__ = [
    "FEATURES_FORMAT",
    "FEATURES_FORMAT_VERSION",
    "FeatureSet",
    "IndexKind",
    "Match",
    "QueryResult",
    "ReIDFeatureModule",
    "RetrievalError",
    "TrackletLinks",
    "build_index",
    "crop_boxes",
    "default_nlist",
    "embed_detections",
    "embed_folder",
    "embed_images",
    "embed_split",
    "eval_transform_for",
    "export_onnx",
    "index_recall",
    "link_metrics",
    "link_mot_scene",
    "link_tracklets",
    "list_images",
    "load_index",
    "load_reid_model",
    "onnxruntime_available",
    "require_onnx",
    "save_index",
    "search",
    "search_gallery",
    "set_nprobe",
    "verify_onnx",
]
