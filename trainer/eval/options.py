"""The names and defaults `llava-eval --help` shows, apart from the code that uses them: that code imports torch and
transformers, and `--help` should answer at once."""

DEFAULT_JUDGE = "gpt-4.1"
ORDERS = ("reference-first", "candidate-first", "both")
PRESET_NAMES = ("default", "qcm-lea", "llava-1.5")  # multiple_choice.PRESETS holds their prompt builders
DEFAULT_FORMAT = "default"
KEY_VARIABLE = "LLAVA_EVAL_MODEL_API_KEY"
