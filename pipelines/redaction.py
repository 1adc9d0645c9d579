"""Credentials left out of text that is printed, logged or shown by Ray."""

import re

CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")  # a URL's `user:password@`


def redact(text: str) -> str:
    """`text` with each URL's credentials left out (`https://user:token@host` -> `https://host`): a tracking URI
    may carry them, and what is printed or logged, or shown by Ray, must not. MLflow reads them from the URI or from
    MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN."""
    return CREDENTIALS.sub(r"\1", text)
