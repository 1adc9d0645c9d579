"""Credentials left out of text that is printed, logged or shown by Ray."""

import logging
import re

CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")  # a URL's `user:password@`
# a query's secrets: `?token=...`, a presigned URL's signature and key id (S3's X-Amz-Signature, X-Amz-Credential,
# Signature and AWSAccessKeyId; Azure's sig; GCS's GoogleAccessId)
SECRET_PARAMETERS = re.compile(r"([?&](?:[^=&#\s]*(?:token|password|secret|signature|credential|accesskeyid|accessid|"
                               r"apikey|api_key)[^=&#\s]*|sig)=)[^&#\s]+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with each URL's credentials left out (`https://user:token@host` -> `https://host`, `?token=abc` ->
    `?token=***`): a tracking URI may carry them, and what is printed or logged, or shown by Ray, must not. MLflow
    reads them from the URI or from MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN."""
    return SECRET_PARAMETERS.sub(r"\1***", CREDENTIALS.sub(r"\1", text))


class RedactingFilter(logging.Filter):
    """Leaves credentials out of a log record's message: MLflow's own error logs quote the URL a request failed on
    ("API request to http://user:token@host/api/... failed"), from its background logging thread and its system
    metrics monitor, where no caller can redact them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:  # the traceback's text, which formatters take as it is set here
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact_mlflow_logs() -> None:
    """Puts a `RedactingFilter` on the handlers MLflow's loggers write through (its own, and the root's, where a
    program configured logging), once a process."""
    for handler in (*logging.getLogger("mlflow").handlers, *logging.getLogger().handlers):
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
