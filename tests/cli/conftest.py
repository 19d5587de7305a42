"""Fixtures of the command-line tests: a model loader that must not run, and a call expected to be
refused as a bad request."""

from __future__ import annotations

import pytest

from heterocache.cli import main


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model fails the test: for requests the command line must refuse beforehand."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a request that is refused")

    import heterocache.eval.cli
    import heterocache.models

    monkeypatch.setattr(heterocache.models, "load_model", refuse)
    monkeypatch.setattr(heterocache.eval.cli, "load_model", refuse)


@pytest.fixture
def exit_2(capsys):
    """``exit_2(argv)``: run the command line, require exit status 2, return what it wrote to stderr."""

    def run(argv) -> str:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        return capsys.readouterr().err

    return run
