"""Passwords in store URLs are masked wherever a URL is shown."""

import pytest

from pipeline.infra.text import masked_text
from pipeline.infra.urls import error_line, hide_in, shown


def test_shown_masks_database_and_server_passwords_and_keeps_the_rest():
    assert shown("postgresql://pipeline:s3cr%40t@localhost:5432/optuna") == "postgresql://pipeline:***@localhost:5432/optuna"
    assert shown("postgresql+psycopg://u:pw@h/db") == "postgresql+psycopg://u:***@h/db"
    assert shown("http://user:pw@db-host:5000") == "http://user:***@db-host:5000"
    for plain in ("sqlite:///studies/optuna.db", "studies/optuna.journal", "http://db-host:5000",
                  "postgresql://u@h/db"):
        assert shown(plain) == plain


def test_hide_in_masks_the_password_inside_a_message_raw_and_decoded():
    url = "postgresql://u:s3cr%40t@h/db"
    message = f"cannot open {url}: password authentication failed (s3cr@t)"
    hidden = hide_in(message, url)
    assert "s3cr" not in hidden and "postgresql://u:***@h/db" in hidden


def test_masked_text_masks_every_urls_password_anywhere_in_a_text_and_leaves_the_rest():
    text = ("API request to http://admin:S3NTINEL-pw@127.0.0.1:9/api/2.0/mlflow/runs/create failed\n"
            "  File x.py: connect('postgresql+psycopg://u:p@ss@db-host:5432/optuna') and postgresql://v:s3cr%40t@h/db")
    masked = masked_text(text)
    assert masked == ("API request to http://admin:***@127.0.0.1:9/api/2.0/mlflow/runs/create failed\n"
                      "  File x.py: connect('postgresql+psycopg://u:***@db-host:5432/optuna') and "
                      "postgresql://v:***@h/db")
    for plain in ("http://db-host:5000/a@b", "postgresql://u@h/db", "http://h:5000 mail: a@b", "sqlite:///x@y.db"):
        assert masked_text(plain) == plain


def test_error_line_is_the_first_line_of_the_message_masked():
    url = "postgresql://u:s3cr%40t@h/db"
    exc = RuntimeError(f"\n  could not connect to {url} (s3cr@t)\nDETAIL: password s3cr@t refused")
    line = error_line(exc, url)
    assert line == "  could not connect to postgresql://u:***@h/db (***)"
    other = ConnectionError("refused by http://admin:S3NTINEL@mlflow-host:5000/api")  # a URL not given: masked too
    assert error_line(other) == "refused by http://admin:***@mlflow-host:5000/api"


@pytest.mark.parametrize("exc", [KeyError(), OSError(""), ValueError("\n \n")])
def test_error_line_of_an_exception_without_a_message_is_its_type(exc):
    assert error_line(exc, "postgresql://u:pw@h/db") == type(exc).__name__


def test_error_line_is_cut_after_masking():
    url = "postgresql://u:" + "p" * 40 + "@h/db"
    line = error_line(RuntimeError("x" * 10 + url), url, limit=30)
    assert line == ("x" * 10 + "postgresql://u:***@h/db")[:30] and "p" * 5 not in line
