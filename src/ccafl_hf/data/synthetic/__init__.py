"""The embedded synthetic multi-camera ReID dataset.

Small pedestrians (head and hair, a patterned top, trousers / shorts / skirt, shoes, maybe a bag;
per-identity proportions) are drawn with PIL and seen by several cameras. Every camera has a strong,
consistent style — background texture and colours, colour cast, brightness/contrast, gamma, blur,
resolution, sensor noise, JPEG quality, framing — so that raw pixels retrieve the same camera far
better than the same person, while the clothes keep identities learnable. Every image also gets
its own jitter (position, scale, walking pose, facing, lighting, colour noise).

The output is a Market-1501 release (``bounding_box_train/``, ``query/``, ``bounding_box_test/``,
``0002_c1s1_000451_03.jpg`` names) read back by the Market-1501 reader. Train and test identities
are disjoint; each identity appears in a random subset of at least ``min_cameras_per_identity``
cameras; the query holds one image per test identity and camera, the gallery the rest plus pid
``0000`` distractors. Everything is a function of the config (same seed → identical files).

Modules: `config` (options, cache location), `looks` (identities), `render` (cameras and images),
`captions` (attribute text of an identity's look), `generate` (the release on disk), `scene` (people
walking through the frames of several cameras, in the MOTChallenge layout). The reader
``load_reid_dataset("synthetic", ...)`` is `ccafl_hf.data.datasets.synthetic`.
"""

from .captions import CAPTION_WORDS, colour_name, describe_look, identity_caption
from .config import GENERATOR_VERSION, SyntheticReIDConfig, default_synthetic_root
from .generate import CONFIG_FILE, generate_synthetic_reid
from .looks import IdentityLook, identity_look
from .render import CameraStyle, camera_styles, render_image
from .scene import SyntheticSceneConfig, generate_synthetic_scene

__all__ = [
    "CAPTION_WORDS",
    "CONFIG_FILE",
    "GENERATOR_VERSION",
    "CameraStyle",
    "IdentityLook",
    "SyntheticReIDConfig",
    "SyntheticSceneConfig",
    "camera_styles",
    "colour_name",
    "default_synthetic_root",
    "describe_look",
    "generate_synthetic_reid",
    "generate_synthetic_scene",
    "identity_caption",
    "identity_look",
    "render_image",
]
