"""File and folder names of a run's output folder."""

EVAL_FILE = "eval_results.json"
TEXT_FEATURES_FILE = "text_features.safetensors"
ADAPTER_DIR = "prompt_adapter"
STATE_FILE = "training_state.safetensors"
SETTINGS_FILE = "resolved_settings.json"  # every resolved setting of the run, written when it starts training
LOOP_CHECKPOINTS = "icdl_ical"  # checkpoints of the stage-2/3 loop: output_dir/checkpoints/icdl_ical
