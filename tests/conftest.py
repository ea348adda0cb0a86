import pytest

from fixtures import FixtureServer


@pytest.fixture
def server():
    srv = FixtureServer()
    yield srv
    srv.close()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder holding a copy of the project's params.yaml (stages read ./params.yaml)."""
    from fixtures import ROOT

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_params(tmp_path):
    """tmp_path/params.yaml: the project's params shrunk once (fixtures.write_tiny_params: TINY_TRAINING, CPU,
    1 thread), as lightning-hydra-template's cfg_train; a test changes what it checks with write_params."""
    from fixtures import write_tiny_params

    return write_tiny_params(tmp_path)
