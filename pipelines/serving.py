"""A trained ModRWKV behind `mlflow models serve`: the pyfunc model of every logged ModRWKV (`logged_models.py`).

A request holds rows in any of MLflow's formats (`{"dataframe_records": [...]}`, `dataframe_split`, `{"inputs":
[...]}` or `{"instances": [...]}`, or `{"inputs": {...}}`: columns, or one row's fields; MLflow makes columns of
`instances` and refuses rows of other media or series lengths there), each a question and one medium:
    {"question": "What digit is this?", "image": "<base64 PNG or JPEG>"}
    {"question": "Transcribe the audio.", "audio": "<base64 WAV or FLAC>"}
    {"question": "Forecast the next 13 weeks.", "series": [315.2, 315.4, ...]}
and gets one prediction per row: {"answer": text}, or {"forecast": [...]} (in the series' own units) from a model
with a forecast head. Media are decoded, checked and encoded as the encode job made the training caches, by the
recorded encoder the model carries; the answer is `modrwkv chat`'s. A bad row fails the request with HTTP 400
and its reason alone (never the request: `RequestError`), each row checked, and its medium decoded and encoded,
before any is answered; a medium the model was logged without the encoder of (a phase I or checkpoint model) with
501, anything else that fails with 500; the server goes on serving. Rows are answered one after another, at most
`MAX_ROWS` a request (an evaluation belongs in `modrwkv eval`). MLflow's server reads a whole body before any of
this runs and limits none: a proxy in front limits it (README, "From a run to a served model").
"""

import base64
import binascii
import math

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, NOT_IMPLEMENTED
from mlflow.pyfunc import PythonModel

MODALITIES = ("image", "audio", "series")
FIELDS = ("question", *MODALITIES)
MAX_MEDIA_BASE64 = 16 * 2**20  # characters; larger media are refused before anything is decoded
MAX_QUESTION_CHARS = 4000
MAX_SERIES_VALUES = 100_000  # a lookback longer than any recipe's (720) by far; each value is a step of prefill
MAX_ROWS = 64  # a request's work is bounded: MLflow answers a timed-out client with 504 but its predict runs on
FORMATS = ("dataframe_records, dataframe_split, inputs or instances as a list of rows, or inputs as a mapping of "
           "columns or of one row's fields")


def absent(value) -> bool:
    """A row's missing field: pandas fills other rows' fields with NaN or None."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def plain(value):
    """A request's value as Python: MLflow hands the fields of `inputs` and `instances` over as numpy arrays (a
    question as a 0-d array, a series as a 1-d one)."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def request_rows(model_input) -> list[dict]:
    """The request's rows, whichever of MLflow's formats it came in (`FORMATS`), every value as Python; ValueError
    for anything else."""
    if hasattr(model_input, "to_dict"):  # dataframe_records, dataframe_split
        rows = model_input.to_dict("records")
    elif isinstance(model_input, dict):
        columns = {k: plain(v) for k, v in model_input.items()}
        if not all(isinstance(v, list) for v in columns.values()):  # a single value: one row's fields
            rows = [columns]
        elif len({len(v) for v in columns.values()}) > 1:
            lengths = {k: len(v) for k, v in columns.items()}
            raise ValueError(f"columns of different lengths, {lengths}; a request holds {FORMATS}")
        else:
            rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    elif isinstance(model_input, list) and all(isinstance(row, dict) for row in model_input):
        rows = model_input
    else:
        raise ValueError(f"not rows of fields but {type(model_input).__name__}; a request holds {FORMATS}")
    if len(rows) > MAX_ROWS:
        raise ValueError(f"{len(rows)} rows, over the limit of {MAX_ROWS} a request; send them in several")
    return [{k: plain(v) for k, v in row.items()} for row in rows]


def media_bytes(text, field: str, where: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{where}: {field} must be a base64 string, got {type(text).__name__}")
    if len(text) > MAX_MEDIA_BASE64:
        raise ValueError(f"{where}: the {field} is {len(text)} base64 characters, over the limit of {MAX_MEDIA_BASE64}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{where}: {field} is not valid base64 ({e})") from None


def checked_row(model, row: dict, where: str) -> tuple[str, str, bytes | list]:
    """A request row's question, modality and medium (its bytes, or a series' values), once it passes every check
    that runs no model; ValueError naming `where` and the reason. Each row of a request is checked before any is
    answered: a bad last row costs the server no work on the rows before it."""
    unknown = sorted(k for k, v in row.items() if k not in FIELDS and not absent(v))
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}; a row holds {list(FIELDS)}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: no question (a non-empty string)")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"{where}: the question is {len(question)} characters, over the limit of {MAX_QUESTION_CHARS}")
    given = [m for m in MODALITIES if not absent(row.get(m))]
    if len(given) != 1:
        raise ValueError(f"{where}: give exactly one of {list(MODALITIES)}, not {given or 'none'}")
    modality = given[0]
    if modality not in model.projectors:
        raise ValueError(f"{where}: this model takes {sorted(model.projectors)}, not {modality}")
    if modality != "series":
        return question, modality, media_bytes(row[modality], modality, where)
    values = row["series"]
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values[:MAX_SERIES_VALUES + 1]):
        raise ValueError(f"{where}: series must be a list of numbers")
    if len(values) > MAX_SERIES_VALUES:
        raise ValueError(f"{where}: the series holds {len(values)} values, over the limit of {MAX_SERIES_VALUES}")
    return question, modality, values


def encoded(media, modality: str, medium: bytes | list, where: str):
    """A checked row's medium (`checked_row`) decoded, checked as the encode job checks it and encoded: its features,
    or a series' `SeriesInput`; ValueError naming `where` for one that does not decode or fails those checks."""
    from preprocessing.validate import Rejected

    if modality == "series":
        return media.series(medium, where)
    try:
        return (media.image if modality == "image" else media.audio)(medium, where)
    except Rejected as e:  # the decoder's reason, which names no row
        raise ValueError(f"{where}: {e}") from None


def answer(model, tokenizer, question: str, modality: str, inputs) -> dict:
    """One row's prediction from its encoded medium (`encoded`)."""
    from modrwkv.chat import ChatSession, forecast_series

    if modality == "series":
        if model.forecast_head is not None:
            return {"forecast": forecast_series(model, tokenizer, question, inputs.features, inputs.lookback,
                                                inputs.mean, inputs.std)}
        inputs = inputs.features
    return {"answer": ChatSession(model, tokenizer, [(modality, inputs)]).ask(question)}


class RequestError(MlflowException):
    """An error whose message stays the project's: MLflow's scoring server prefixes a predict error's message with the
    whole request ("Failed to predict data '<rows>'"), which sent a refused medium of megabytes back to its
    client."""

    @property
    def message(self) -> str:
        return self.args[0]

    @message.setter
    def message(self, value: str) -> None:
        pass  # the server's prefix; the message is the exception's argument


class ModRWKVService(PythonModel):
    """Loads the model folder and its encoders from the logged model's artifacts; answers rows in order."""

    def build_encoders(self) -> None:
        """Every encoder the model's media need and the logged model carries, built now rather than at the first
        request: a server answering /ping has loaded them, and weights other than those the model was trained
        with fail its start."""
        for modality in self.model.projectors:
            if self.media.needs_encoder(modality) and self.media.encoder_dirs.get(modality):
                self.media.encoder(modality)

    def load_context(self, context) -> None:
        from modrwkv.inference import prepare_for_inference
        from modrwkv.tokenizer import WorldTokenizer
        from preprocessing.encoders.recorded import MediaEncoders

        from .logged_models import ENCODER_ARTIFACT, MODEL_ARTIFACT
        from .trained_model import load_trained_model

        model_dir = context.artifacts[MODEL_ARTIFACT]
        # an adapter-only model whose backbone was recorded by URI (a cluster's phase I) fetches it, as chat does
        self.model = prepare_for_inference(load_trained_model(model_dir))
        self.tokenizer = WorldTokenizer()
        encoders = {m: context.artifacts.get(ENCODER_ARTIFACT.format(m)) for m in MODALITIES}
        self.media = MediaEncoders(model_dir, encoders)
        self.build_encoders()

    def predict(self, context, model_input, params=None) -> list[dict]:
        from preprocessing.encoders.recorded import MissingEncoder

        try:
            rows = [checked_row(self.model, row, f"row {i}") for i, row in enumerate(request_rows(model_input))]
            # every medium decoded, checked and encoded before any row is answered: a bad one, or one the server
            # has no encoder for, costs no generation of the rows before it
            inputs = [encoded(self.media, modality, medium, f"row {i}")
                      for i, (_, modality, medium) in enumerate(rows)]
            return [answer(self.model, self.tokenizer, question, modality, features)
                    for (question, modality, _), features in zip(rows, inputs)]
        except MissingEncoder as e:  # the server's lack, not the request's: 501
            raise RequestError(f"{e}; this logged model carries none (serve one logged with it)",
                               error_code=NOT_IMPLEMENTED) from None
        except ValueError as e:  # a bad request, not a failure of the server: HTTP 400 with the reason
            raise RequestError.invalid_parameter_value(str(e)) from None
        except Exception as e:  # MLflow would call any error a bad request
            raise RequestError(f"the server failed to answer: {type(e).__name__}: {e}",
                               error_code=INTERNAL_ERROR) from e
