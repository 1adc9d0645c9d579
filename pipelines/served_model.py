"""What MLflow runs to build a logged ModRWKV's pyfunc model ("models from code": the model is this file and its
artifacts, nothing pickled). See `serving.py`."""

from mlflow.models import set_model

from pipelines.serving import ModRWKVService

set_model(ModRWKVService())
