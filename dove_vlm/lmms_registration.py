"""dove-vlm's entry in lmms-eval's model registry (entry-point group `lmms_eval.models`).

lmms-eval reads this group when `lmms_eval.models` is imported, so after `pip install` the name
`dove_llava` works with `python -m lmms_eval --model dove_llava` and `simple_evaluate(model="dove_llava")`
without any change to lmms-eval. The manifest only names the class; nothing heavy is imported until
lmms-eval asks for the model.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "dove_llava"
MODEL_CLASS_PATH = "llava_adapter.lmms_model.DoveLlava"


def dove_llava_manifest() -> ModelManifest:
    """The entry-point target: a callable returning the manifest, as lmms-eval's registry accepts."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)
