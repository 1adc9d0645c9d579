"""lmms-eval's plugin entry point (pyproject.toml, group "lmms_eval.models"): lmms-eval 0.6 and later resolve
`simple_evaluate(model="modrwkv", ...)` through it to `pipelines.lmms_eval_model.ModRWKVEvalModel`, which it
imports only then (this module imports nothing of ours: lmms-eval loads every plugin when it starts)."""

MODEL_ID = "modrwkv"
CLASS_PATH = "pipelines.lmms_eval_model.ModRWKVEvalModel"


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
