"""The method contract of tests/test_contract.py for the methods whose default preset trains
another backbone than the ViT (ResNet, AlexNet, NIN, GPT): the same check, in its own file so
that the two halves of the registry run on two pytest-xdist workers. None of these methods
reads a teacher run."""
import pytest

from test_contract import check_contract, methods_on_vit


@pytest.mark.parametrize("method", methods_on_vit(False))
def test_every_convnet_method_trains_resumes_and_names_its_model(method, tmp_path, monkeypatch,
                                                                 compilation_cache):
  check_contract(method, str(tmp_path / "no_teacher"), tmp_path, monkeypatch)
