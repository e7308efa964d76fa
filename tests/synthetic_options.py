"""Options of the small synthetic dataset shared by the tests (a plain module: importable by name)."""

SMALL_SYNTHETIC = dict(
    num_train_identities=24, num_test_identities=16, num_cameras=3, images_per_identity_per_camera=3,
    num_distractors=6, image_size=(64, 32), seed=0,
)
